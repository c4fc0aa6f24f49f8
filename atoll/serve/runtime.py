"""The robot side: a fixed-rate control loop with inference in a background thread.

Every s control ticks (and whenever none is in flight after that) the loop
asks for a new chunk in a background thread, with the observation of that
tick, the plan it is executing (aligned to that tick, for strategies that
condition on it) and its delay estimate d_plan. Meanwhile it keeps popping
actions off its plan at `hz`. At the start of every tick it looks whether the
chunk has arrived; the number of actions it sent since the request is the
measured delay d (a chunk back within one tick period: d = 1), and the
strategy (atoll.core.chunking) decides the new plan:

  naive_async, rtc, prefix, remac,   the new chunk from row d on
  faster
  vlash                              the old plan until d_plan, then the new chunk
                                     (it was computed for that tick)
  fused                              the new chunk blended into the old at row d
                                     (plain switch when d > H - 3)
  temporal_ensemble                  every chunk covering a tick votes (ACT)
  sync                               the loop waits for the chunk (no actions
                                     are sent meanwhile) and runs it from row 0

Delay estimate (`DelayEstimator`): the largest measured delay over the last
`window` calls, counting actions actually consumed, and never the first
`warmup_calls` calls (JIT compilation, connection set-up): a warm-up call that
took 2 s would otherwise make every later chunk skip actions it needs
(LeRobot #4223, #4454). If the plan runs out before a chunk arrives, the last
action is held and the tick counts as starved.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from atoll.core import chunking

# (obs, running_HA or None, d_plan) -> chunk_HA
InferFn = Callable[[Any, np.ndarray | None, int], np.ndarray]


class DelayEstimator:
    """The delay to plan for: the max of the last `window` measured delays,
    warm-up calls excluded; `initial` until a measurement exists."""

    def __init__(self, warmup_calls: int = 1, window: int = 10, initial: int = 0):
        if warmup_calls < 0 or window < 1 or initial < 0:
            raise ValueError("warmup_calls and initial must be >= 0 and window >= 1")
        self.warmup_calls, self.initial = warmup_calls, initial
        self.calls = 0
        self.measured: collections.deque[int] = collections.deque(maxlen=window)
        self.warmup: list[int] = []

    def record(self, consumed: int) -> None:
        self.calls += 1
        (self.warmup if self.calls <= self.warmup_calls else self.measured).append(int(consumed))

    @property
    def estimate(self) -> int:
        return max(self.measured) if self.measured else self.initial


@dataclasses.dataclass
class RuntimeStats:
    ticks: int = 0
    starved_ticks: int = 0  # the plan ran out: the last action was held
    waiting_ticks: int = 0  # sync: ticks spent waiting for a chunk
    chunks: int = 0
    delays: list[int] = dataclasses.field(default_factory=list)  # measured per call, warm-up included
    actions: list[np.ndarray] = dataclasses.field(default_factory=list)


class Runtime:
    """Runs `steps` control ticks: get_obs() -> obs, apply(action) sends one
    action; infer(obs, running_HA, d_plan) -> chunk_HA runs in a background
    thread (a PolicyClient's or a local policy's). clock/sleep are injectable."""

    def __init__(self, infer: InferFn, get_obs: Callable[[], Any], apply: Callable[[np.ndarray], None], *,
                 hz: float, strategy: chunking.Strategy | str, horizon: int, execute_steps: int,
                 warmup_calls: int = 1, delay_window: int = 10, initial_delay: int = 0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.strategy = chunking.Strategy(strategy) if isinstance(strategy, str) else strategy
        if hz <= 0:
            raise ValueError(f"hz = {hz} must be positive")
        chunking.check_horizons(self.strategy.name, 0, execute_steps, horizon)
        self.infer, self.get_obs, self.apply = infer, get_obs, apply
        self.hz, self.H, self.s = hz, horizon, execute_steps
        self.delay = DelayEstimator(warmup_calls, delay_window, initial_delay)
        self.clock, self.sleep = clock, sleep
        self.stats = RuntimeStats()
        self._plan: np.ndarray | None = None  # rows from the current tick on
        self._votes: list[tuple[int, np.ndarray]] = []  # temporal ensemble: (start tick, chunk)
        self._last: np.ndarray | None = None
        self._flight: dict[str, Any] | None = None
        self._since_request = 0

    # ------------------------------------------------------------ the plan

    def _aligned(self) -> np.ndarray | None:
        """The current plan as H rows from now, padded with its last action."""
        if self._plan is None or len(self._plan) == 0:
            return None if self._last is None else np.repeat(self._last[None], self.H, 0)
        rows = self._plan[: self.H]
        return np.concatenate([rows, np.repeat(rows[-1:], self.H - len(rows), 0)]) if len(rows) < self.H else rows

    def _merge(self, chunk: np.ndarray, d: int, d_plan: int, old: np.ndarray | None) -> None:
        name = self.strategy.name
        if name == "temporal_ensemble":
            self._votes.append((self.stats.ticks - d, chunk))
            self._votes = [(t, c) for t, c in self._votes if t + len(c) > self.stats.ticks]
            return
        offset = d_plan if name == "vlash" else 0  # row 0 of a VLASH chunk is for d_plan ticks after the request
        if old is None or name == "sync":
            self._plan = chunk if name == "sync" else chunk[min(max(d - offset, 0), len(chunk) - 1):]
            return
        if name == "vlash":
            self._plan = np.concatenate([old[d:d_plan], chunk]) if d < d_plan else chunk[d - d_plan:]
        elif name == "fused" and d <= self.H - 3:  # the fuser needs three rows from the seam on
            fused = np.asarray(chunking.fuse(old[None], chunk[None], d, self.strategy.fuse_steps))[0]
            self._plan = fused[d:]
        else:
            self._plan = chunk[d:]
        if len(self._plan) == 0:
            self._plan = chunk[-1:]

    def _pop(self) -> np.ndarray | None:
        if self.strategy.name == "temporal_ensemble":
            t = self.stats.ticks
            votes = [c[t - start] for start, c in self._votes if 0 <= t - start < len(c)]
            if not votes:
                return self._last
            w = np.exp(-self.strategy.te_decay * np.arange(len(votes)))  # oldest first: ACT's weights
            return np.tensordot(w / w.sum(), np.stack(votes), axes=1)
        if self._plan is None or len(self._plan) == 0:
            return self._last
        action, self._plan = self._plan[0], self._plan[1:]
        return action

    # ------------------------------------------------------------- inference

    def _start_request(self) -> None:
        obs = self.get_obs()
        d_plan = self.delay.estimate
        old = self._aligned()
        box: dict[str, Any] = {"obs": obs, "d_plan": d_plan, "old": old, "consumed": 0, "done": threading.Event()}

        def work():
            try:
                box["chunk"] = np.asarray(self.infer(obs, old, d_plan), np.float32)
            except BaseException as e:  # handed to the control loop, which raises it
                box["error"] = e
            box["done"].set()

        threading.Thread(target=work, daemon=True, name="inference").start()
        self._flight, self._since_request = box, 0

    def _finish_request(self) -> None:
        box, self._flight = self._flight, None
        if "error" in box:
            raise box["error"]
        d = box["consumed"]
        self.delay.record(d)
        self.stats.delays.append(d)
        self.stats.chunks += 1
        self._merge(box["chunk"], d, box["d_plan"], box["old"])

    def run(self, steps: int) -> RuntimeStats:
        period = 1.0 / self.hz
        next_tick = self.clock()
        for _ in range(steps):
            if self._flight is not None and self._flight["done"].is_set():  # arrived since the last tick
                self._finish_request()
            if self._flight is None and (self._last is None or self._since_request >= self.s):
                self._start_request()
            if self._flight is not None and (self._last is None or self.strategy.name == "sync"):
                # nothing to run yet (the first chunk), or sync: wait for the chunk
                while not self._flight["done"].wait(period):
                    self.stats.waiting_ticks += 1
                self._finish_request()
                next_tick = self.clock()
            starved = self.strategy.name != "temporal_ensemble" and (self._plan is None or len(self._plan) == 0)
            action = self._pop()
            if action is None:
                raise RuntimeError("no action to run: the first chunk never arrived")
            self.stats.starved_ticks += int(starved)
            self.apply(action)
            self._last = np.asarray(action)
            self.stats.actions.append(self._last)
            self.stats.ticks += 1
            self._since_request += 1
            if self._flight is not None:
                self._flight["consumed"] += 1
            next_tick += period
            wait = next_tick - self.clock()
            if wait > 0:
                self.sleep(wait)
        if self._flight is not None:
            self._flight["done"].wait()
            self._flight = None
        return self.stats
