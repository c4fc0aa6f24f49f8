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
    with pytest.raises(ValueError, match="d <= s"):
        ai.run_study("ci", tmp_path, strategies=["rtc"], progress=False, preset=dict(MICRO, delays=(0, 6)))
    assert not (tmp_path / "policies").exists()  # nothing trained before the checks
