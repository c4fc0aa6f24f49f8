"""A websocket policy server speaking openpi's protocol, with request batching.

Protocol (what openpi-style clients expect): on connect the server sends its
metadata (a msgpack map); then every binary message from the client is an
observation map, answered by a map holding "actions" (an array [H, A]) and
"server_timing" (milliseconds). A request that cannot be served (not msgpack,
a missing key, a wrong shape or dtype, NaN) is answered on that connection
with a text frame "error: ..." (openpi's client raises it as a server error);
the connection stays open and everyone else is served as before.

Requests from all connections meet in one queue; the batcher takes whatever
is waiting (up to max_batch), runs one batched inference in a worker thread
and answers each. Batches are padded to powers of two, so a jitted policy
compiles a handful of shapes once (`warm_up` compiles them before serving).
Every request's latency (receive to reply, and inference alone) is logged and
kept in `stats`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from absl import logging

from atoll.serve import wire


class RequestError(ValueError):
    """An observation this policy cannot answer; the message says why."""


class ServedPolicy(Protocol):
    """What the server needs from a policy."""

    def metadata(self) -> dict[str, Any]: ...

    def new_session(self) -> Any: ...

    def parse(self, obs: Any, session: Any) -> Any:
        """A validated request from one observation message (RequestError otherwise)."""

    def infer(self, requests: list[Any], batch_size: int) -> list[np.ndarray]:
        """Action chunks for the requests, computed as one batch padded to batch_size."""


def batch_bucket(n: int, max_batch: int) -> int:
    """The padded batch size for n requests: the next power of two, at most max_batch."""
    return min(max_batch, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class ServerStats:
    """Counters and the latest latencies (ms) since the server started."""

    requests: int = 0
    errors: int = 0
    batches: int = 0
    connections: int = 0
    latency_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=100_000))
    infer_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=100_000))
    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def percentiles(self, qs=(50, 90, 99)) -> dict[str, float]:
        lat = np.asarray(self.latency_ms, float)
        return {f"p{q}": float(np.percentile(lat, q)) for q in qs} if lat.size else {}


async def _send(ws, message) -> bool:
    """Sends; False when the client has gone (its request was answered into the void)."""
    from websockets.exceptions import ConnectionClosed

    try:
        await ws.send(message)
        return True
    except ConnectionClosed:
        return False


class PolicyServer:
    """Serves `policy` on ws://host:port (port 0: any free port, see `port` once started).
    A message over max_message_mb closes only its own connection (websocket code
    1009); None lifts the limit (openpi's servers set none)."""

    def __init__(self, policy: ServedPolicy, host: str = "0.0.0.0", port: int = 8000, max_batch: int = 16,
                 log_every: int = 0, max_message_mb: float | None = 64.0):
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch} must be at least 1")
        if max_message_mb is not None and max_message_mb <= 0:
            raise ValueError(f"max_message_mb = {max_message_mb} must be positive (None: no limit)")
        self.max_message_bytes = None if max_message_mb is None else int(max_message_mb * 2**20)
        self.policy, self.host, self.port, self.max_batch = policy, host, port, max_batch
        self.log_every = log_every
        self.stats = ServerStats()
        self._queue: asyncio.Queue | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._server = None
        self._batcher: asyncio.Task | None = None

    def warm_up(self, *example_obs: Mapping[str, Any]) -> None:
        """Compiles every padded batch size, for each kind of example request
        (e.g. a plain one and one with a running chunk), before a client waits."""
        for obs in example_obs:
            request = self.policy.parse(obs, self.policy.new_session())
            size = 1
            while True:
                self.policy.infer([request] * size, size)
                if size >= self.max_batch:
                    break
                size = min(size * 2, self.max_batch)

    # -------------------------------------------------------------- serving

    async def _handle(self, ws) -> None:
        self.stats.connections += 1
        await ws.send(wire.packb(self.policy.metadata()))
        session = self.policy.new_session()
        async for message in ws:
            t0 = time.perf_counter()
            try:
                request = self.policy.parse(wire.unpackb(message), session)
            except Exception as e:  # noqa: BLE001 - whatever a request holds, only its sender hears about it
                self.stats.errors += 1
                text = str(e) if isinstance(e, (wire.WireError, RequestError)) else f"{type(e).__name__}: {e}"
                logging.warning("bad request: %s", text)
                if not await _send(ws, f"error: {text}"):
                    return
                continue
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            await self._queue.put((request, done))
            try:
                actions, infer_ms = await done
            except Exception as e:  # an inference failure answers that request, the server goes on
                self.stats.errors += 1
                logging.error("inference failed: %s", e)
                if not await _send(ws, f"error: inference failed: {type(e).__name__}: {e}"):
                    return
                continue
            total_ms = (time.perf_counter() - t0) * 1e3
            if not await _send(ws, wire.packb({"actions": actions, "server_timing": {"infer_ms": infer_ms,
                                                                                     "total_ms": total_ms}})):
                return
            self.stats.requests += 1
            self.stats.latency_ms.append(total_ms)
            self.stats.infer_ms.append(infer_ms)
            logging.info("request %d: %.2f ms (inference %.2f ms)", self.stats.requests, total_ms, infer_ms)
            if self.log_every and self.stats.requests % self.log_every == 0:
                p = self.stats.percentiles()
                print(f"{self.stats.requests} requests, {self.stats.errors} errors, latency p50 {p['p50']:.1f} ms "
                      f"p99 {p['p99']:.1f} ms", flush=True)

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            requests = [r for r, _ in batch]
            size = batch_bucket(len(batch), self.max_batch)
            t0 = time.perf_counter()
            try:
                chunks = await loop.run_in_executor(self._worker, self.policy.infer, requests, size)
            except Exception as e:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(e)
                continue
            infer_ms = (time.perf_counter() - t0) * 1e3
            self.stats.batches += 1
            self.stats.batch_sizes[len(batch)] += 1
            for (_, done), chunk in zip(batch, chunks):
                if not done.done():
                    done.set_result((chunk, infer_ms))

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._batch_loop())
        # 64 MiB by default: camera images fit, a runaway client cannot exhaust the host's memory.
        self._server = await serve(self._handle, self.host, self.port, max_size=self.max_message_bytes,
                                   compression=None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._batcher is not None:
            self._batcher.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def serve_forever(self) -> None:
        await self.start()
        print(f"serving on ws://{self.host}:{self.port} (max batch {self.max_batch})", flush=True)
        await asyncio.Future()


class BackgroundServer:
    """A PolicyServer on its own event loop in a daemon thread (tests, benchmarks,
    notebooks): `with BackgroundServer(server) as port: ...`."""

    def __init__(self, server: PolicyServer):
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="policy-server")

    def __enter__(self) -> int:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self.server.port

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        await self.server.stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # let them finish before the loop stops


# ------------------------------------------------------------ chunk policies


@dataclasses.dataclass
class _Session:
    history: np.ndarray | None = None  # [T_o, O], this connection's observation history


@dataclasses.dataclass
class ChunkPolicyRequest:
    obs_TO: np.ndarray
    running_HA: np.ndarray | None
    delay: int


class ChunkPolicyServer:
    """A trained chunk policy behind the server (see atoll.experiments.serve_policy).

    Observation keys: "state" (or openpi's "observation/state"), float [O] (the
    server keeps this connection's last T_o observations, the first one
    repeated, as in training) or [T_o, O] (the client's own history); "reset":
    true starts a new history. With an execution strategy that conditions on
    the running chunk (rtc, prefix, remac, faster), "running_actions" [H, A] (aligned
    to this observation) and "delay" (int d) may come along; without them the
    chunk is sampled plainly.
    """

    STATE_KEYS = ("state", "observation/state")

    def __init__(self, policy, weights, *, execute_steps: int, strategy: str | None = None, seed: int = 0,
                 info: Mapping[str, Any] | None = None):
        import jax

        from atoll.core import chunking

        self.policy, self.weights, self.execute_steps = policy, weights, execute_steps
        self.strategy = chunking.Strategy(strategy) if strategy else None
        self.obs_dim = int(np.asarray(weights["obs_norm"]["offset_D"]).shape[-1])
        self.info = dict(info or {})
        self._key = jax.random.key(seed)
        self._count = 0
        self._lock = threading.Lock()
        self._act = jax.jit(policy.act)
        self._act_with = (jax.jit(lambda w, o, r, d, k: policy.act_with(self.strategy, execute_steps, w, o, r, d,
                                                                        False, k))
                          if self.strategy is not None else None)

    def metadata(self) -> dict[str, Any]:
        p = self.policy
        return {"server": "atoll", "action_horizon": p.action_horizon, "action_dim": p.action_dim,
                "obs_horizon": p.obs_horizon, "obs_dim": self.obs_dim, "execute_steps": self.execute_steps,
                "strategy": self.strategy.name if self.strategy else None,
                "network_evaluations": p.objective.network_evaluations, **self.info}

    def new_session(self) -> _Session:
        return _Session()

    def _array(self, obs: Mapping, key: str, shapes: list[tuple[int, ...]]) -> np.ndarray:
        value = obs[key]
        if not isinstance(value, np.ndarray) and isinstance(value, (list, tuple, float, int)):
            try:
                value = np.asarray(value)
            except ValueError as e:  # a ragged list
                raise RequestError(f"{key!r} is not a rectangular array: {e}") from None
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise RequestError(f"{key!r} must be a numeric array, got {type(value).__name__}"
                               + (f" of {value.dtype}" if isinstance(value, np.ndarray) else ""))
        if value.shape not in shapes:
            raise RequestError(f"{key!r} has shape {value.shape}; expected " + " or ".join(map(str, shapes)))
        value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise RequestError(f"{key!r} holds NaN or infinite values")
        return value

    def parse(self, obs: Any, session: _Session) -> ChunkPolicyRequest:
        if not isinstance(obs, Mapping):
            raise RequestError(f"an observation must be a map, got {type(obs).__name__}")
        key = next((k for k in self.STATE_KEYS if k in obs), None)
        if key is None:
            raise RequestError(f"missing key {self.STATE_KEYS[0]!r} (or {self.STATE_KEYS[1]!r}): the robot state, "
                               f"float [{self.obs_dim}] or [{self.policy.obs_horizon}, {self.obs_dim}]; got keys "
                               f"{sorted(map(str, obs))}")
        T, O = self.policy.obs_horizon, self.obs_dim
        state = self._array(obs, key, [(O,), (T, O)])
        reset = obs.get("reset", False)
        if not isinstance(reset, (bool, np.bool_, int)):
            raise RequestError(f"'reset' must be true or false, got {type(reset).__name__}")
        if state.ndim == 2:
            history = state
        else:
            if reset or session.history is None:
                session.history = np.repeat(state[None], T, axis=0)
            else:
                session.history = np.concatenate([session.history[1:], state[None]])
            history = session.history
        running, delay = None, 0
        if "running_actions" in obs:
            if self.strategy is None or not self.strategy.guided:
                raise RequestError("'running_actions' needs a server started with --strategy=rtc|prefix|remac|faster")
            running = self._array(obs, "running_actions", [(self.policy.action_horizon, self.policy.action_dim)])
            delay = obs.get("delay", 0)
            if not isinstance(delay, (int, np.integer)) or not 0 <= int(delay) < self.policy.action_horizon:
                raise RequestError(f"'delay' must be an int in [0, {self.policy.action_horizon - 1}], got {delay!r}")
        return ChunkPolicyRequest(history, running, int(delay))

    def _next_key(self):
        import jax

        with self._lock:
            self._count += 1
            return jax.random.fold_in(self._key, self._count)

    def infer(self, requests: list[ChunkPolicyRequest], batch_size: int) -> list[np.ndarray]:
        """Plain requests and those carrying a running chunk go as two batches
        (guidance must not pull a plain request towards an empty chunk)."""
        out: list[np.ndarray | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if r.running_HA is None]
        guided = [i for i, r in enumerate(requests) if r.running_HA is not None]
        for group, fn in ((plain, self._plain), (guided, self._guided)):
            if group:
                size = batch_bucket(len(group), batch_size) if len(group) < batch_size else len(group)
                for i, chunk in zip(group, fn([requests[i] for i in group], size)):
                    out[i] = chunk
        return out

    def _plain(self, requests: list[ChunkPolicyRequest], size: int) -> list[np.ndarray]:
        import jax.numpy as jnp

        obs = np.stack([r.obs_TO for r in requests] + [requests[0].obs_TO] * (size - len(requests)))
        out = np.asarray(self._act(self.weights, jnp.asarray(obs), self._next_key()))
        return [out[i] for i in range(len(requests))]

    def _guided(self, requests: list[ChunkPolicyRequest], size: int) -> list[np.ndarray]:
        import jax.numpy as jnp

        pad = [requests[0]] * (size - len(requests))
        obs = np.stack([r.obs_TO for r in requests + pad])
        running = np.stack([r.running_HA for r in requests + pad])
        delay = np.asarray([r.delay for r in requests + pad], np.int32)
        out = np.asarray(self._act_with(self.weights, jnp.asarray(obs), jnp.asarray(running), jnp.asarray(delay),
                                        self._next_key()))
        return [out[i] for i in range(len(requests))]
