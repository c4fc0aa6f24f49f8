"""The robot-side runtime: delay measured in consumed actions, warm-up excluded, strategies merge chunks."""

import threading

import numpy as np
import pytest

from atoll.serve import runtime as runtime_lib

H, S = 8, 2


class Robot:
    """Counts the actions it receives; inference call n waits until `lags[n]` more
    actions have been consumed, then answers a chunk whose rows are 100·n + row."""

    def __init__(self, lags):
        self.lags, self.calls, self.applied = lags, 0, []
        self.cond = threading.Condition()

    def apply(self, action):
        with self.cond:
            self.applied.append(float(action[0]))
            self.cond.notify_all()

    def infer(self, obs, running, d_plan):
        n = self.calls
        self.calls += 1
        with self.cond:
            start = len(self.applied)
            self.cond.wait_for(lambda: len(self.applied) >= start + self.lags[min(n, len(self.lags) - 1)], timeout=10)
        return (100.0 * n + np.arange(H, dtype=np.float32))[:, None]


def run(lags, strategy="naive_async", steps=30, warmup_calls=2):
    robot = Robot(lags)
    rt = runtime_lib.Runtime(robot.infer, lambda: np.zeros(3), robot.apply, hz=100.0, strategy=strategy, horizon=H,
                             execute_steps=S, warmup_calls=warmup_calls)
    return rt, rt.run(steps), robot


def test_delay_estimate_counts_consumed_actions_and_skips_the_warm_up():
    # call 0 (before any action) and call 1 (a slow, compiling one) are warm-up; then 1 or 2 actions per call
    rt, stats, robot = run([0, 6, 1], steps=16)
    assert stats.delays[0] == 0 and stats.delays[1] >= 5
    assert rt.delay.warmup == stats.delays[:2]
    assert 1 <= rt.delay.estimate <= 3  # the slow warm-up call does not count
    rt2, _, _ = run([0, 6, 1], steps=16, warmup_calls=1)
    assert rt2.delay.estimate >= 5  # counted, it would make every chunk skip actions


def test_naive_async_runs_the_new_chunk_from_the_measured_delay_on():
    rt, stats, robot = run([0, 1, 1], steps=12, warmup_calls=1)
    applied = robot.applied
    assert applied[:2] == [0.0, 1.0]  # the first chunk
    # each later chunk n was asked for at some tick and arrived d actions later: its rows from d on run
    n_rows = [(int(a) // 100, int(a) % 100) for a in applied]
    for (n, row), (n2, row2) in zip(n_rows, n_rows[1:]):
        assert (n2 == n and row2 == row + 1) or (n2 == n + 1 and row2 >= 1), applied
    assert stats.chunks >= 4 and stats.waiting_ticks >= 0


def test_sync_waits_and_runs_each_chunk_from_its_start():
    _, stats, robot = run([0], strategy="sync", steps=10, warmup_calls=1)  # sync sends nothing while it waits
    rows = [int(a) % 100 for a in robot.applied]
    assert rows == [0, 1] * 5  # s = 2 rows of every chunk, never skipping


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="hz"):
        runtime_lib.Runtime(None, None, None, hz=0, strategy="naive_async", horizon=H, execute_steps=S)
    with pytest.raises(ValueError, match="unknown"):
        runtime_lib.Runtime(None, None, None, hz=10, strategy="soon", horizon=H, execute_steps=S)
    with pytest.raises(ValueError, match=r"\[1, H"):
        runtime_lib.Runtime(None, None, None, hz=10, strategy="naive_async", horizon=H, execute_steps=H + 1)
