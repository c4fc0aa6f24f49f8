"""The asynchronous-inference reproduction at a micro size: contract, reuse, errors."""

import json

import pytest

from atoll.core import chunking
from atoll.experiments.reproduce import async_inference as ai

MICRO = dict(ai.PRESETS["ci"], delays=(0, 4), episodes=32, num_demos=16,
             model={"dim": 16, "depth": 1, "heads": 2},  # the smallest DiT: less to compile
             train={"steps": 20, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "log_every": 10,
                    "checkpoint_every": 20},
             eval={"every": 20, "final_episodes": 16, "episodes": 16})


def test_micro_study_writes_the_contract_and_reuses_its_work(tmp_path):
    out = tmp_path / "async"
    results = ai.run_study("ci", out, strategies=["naive_async", "sync"], progress=False, preset=MICRO)
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == results["runs"] and len(saved["runs"]) == 4
    for r in saved["runs"]:
        assert r["strategy"] in chunking.STRATEGIES and r["env"] == "intercept" and r["s"] == 4
        assert isinstance(r["d"], int) and 0 <= r["success"] <= 1 and r["episode_time"] > 0 and r["jerk"] >= 0
    cell = {(r["strategy"], r["d"]): r for r in saved["runs"]}
    # sync waits d steps per chunk with the world paused: the same episodes, longer
    assert cell[("sync", 4)]["success"] == cell[("sync", 0)]["success"]
    assert cell[("sync", 4)]["episode_time"] > cell[("sync", 0)]["episode_time"]
    assert cell[("sync", 0)]["episode_time"] == pytest.approx(cell[("naive_async", 0)]["episode_time"])
    acc = saved["acceptance"][0]
    assert acc["d"] == 4 and acc["naive_loss"] == pytest.approx(cell[("naive_async", 0)]["success"]
                                                                - cell[("naive_async", 4)]["success"])
    md = (out / "results.md").read_text()
    assert "| naive_async |" in md and "Acceptance" in md and "Kinetix" in md and "Partial" not in md
    assert "**Partial: 1 of 2 environments done** (still to come: waypoints;" in ai.results_markdown(
        dict(saved, planned_envs=["intercept", "waypoints"]))
    assert (out / "success_vs_delay.png").stat().st_size > 0 and (out / "time_and_jerk.png").stat().st_size > 0
    assert [p["conditioning"] for p in saved["policies"]] == ["none"]  # both strategies use the plain policy

    evals = sorted((out / "evals").iterdir())
    stamps = [p.stat().st_mtime_ns for p in evals]
    again = ai.run_study("ci", out, strategies=["naive_async", "sync"], progress=False, preset=MICRO)
    assert again["runs"] == results["runs"] and [p.stat().st_mtime_ns for p in evals] == stamps

    other = dict(MICRO, model={"dim": 32, "depth": 1, "heads": 2})  # MICRO's is 16 wide
    with pytest.raises(ai.ReproductionError, match="model.dim"):  # a finished policy of another preset
        ai.run_study("ci", out, strategies=["naive_async"], progress=False, preset=other)


def test_unknown_names_and_impossible_horizons_fail_clearly(tmp_path):
    with pytest.raises(ai.ReproductionError, match="unknown strategy"):
        ai.run_study("ci", tmp_path, strategies=["asap"], progress=False, preset=MICRO)
    with pytest.raises(ai.ReproductionError, match="unknown env"):
        ai.run_study("ci", tmp_path, envs=["kinetix"], progress=False, preset=MICRO)
    with pytest.raises(ValueError, match="s <= H - d"):  # d = 6 runs at s = 6, and H = 8 cannot cover 6 + 6
        ai.run_study("ci", tmp_path, strategies=["rtc"], progress=False, preset=dict(MICRO, delays=(0, 6)))
    assert not (tmp_path / "policies").exists()  # nothing trained before the checks


def test_executions_grow_s_with_d_and_add_that_s_baseline():
    assert ai.executions((0, 1, 2, 4), 4) == [(0, 4), (1, 4), (2, 4), (4, 4)]  # ci: one s
    assert ai.executions(ai.PRESETS["full"]["delays"], ai.PRESETS["full"]["execute_steps"]) == [
        (0, 4), (1, 4), (2, 4), (4, 4), (0, 8), (8, 8)]
    for d, s in ai.executions((0, 1, 2, 4, 8), 4):  # every full cell is one the strategies accept
        for name in chunking.STRATEGIES:
            chunking.check_horizons(name, d, s, ai.PRESETS["full"]["horizon"])


def _row(strategy, d, s, success, time):
    return {"env": "intercept", "strategy": strategy, "d": d, "s": s, "success": success, "episode_time": time,
            "jerk": 1.0, "episodes": 10}


def test_acceptance_and_table_keep_each_s_apart():
    rows = [_row("naive_async", 0, 4, 0.9, 3.0), _row("naive_async", 4, 4, 0.3, 6.0),
            _row("naive_async", 0, 8, 0.5, 4.0), _row("naive_async", 8, 8, 0.1, 7.0),
            _row("sync", 0, 4, 0.9, 3.0), _row("sync", 4, 4, 0.9, 5.0),
            _row("rtc", 4, 4, 0.87, 4.0), _row("rtc", 0, 8, 0.45, 4.0)]
    acc = ai.acceptance(rows, "intercept")
    # d = 0 at the same s (0.9), not the s = 8 baseline (0.5)
    assert acc["s"] == 4 and acc["naive_loss"] == pytest.approx(0.6) and acc["d0_success"] == 0.9
    (rtc,) = acc["recovering"]
    assert rtc["gap"] == pytest.approx(0.03) and rtc["within_5"] and rtc["faster_than_sync"] and acc["holds"]
    results = {"preset": "full", "envs": ["intercept"], "strategies": ["naive_async", "rtc"], "runs": rows,
               "setting": {"horizon": 16, "execute_steps": 4}}
    md = ai.results_markdown(results)
    assert "| strategy | d = 0 | d = 4 | d = 0, s = 8 | d = 8, s = 8 | jerk at d = 8, s = 8 |" in md
    assert "| naive_async | 90.0% (3.00) | 30.0% (6.00) | 50.0% (4.00) | 10.0% (7.00) | 1 |" in md
    assert "| rtc | – | 87.0% (4.00) | 45.0% (4.00) | – | – |" in md
