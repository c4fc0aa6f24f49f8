"""The Meta-World reproduction: its contract at a micro size, reuse, and its pure pieces."""

import json

import pytest

from atoll.experiments.reproduce import metaworld_policy as mp

pytest.importorskip("metaworld")

MICRO = {"tasks": ("reach-v3",), "demos": (3,), "objectives": ("ddpm", "flow"), "seeds": (0,), "eval_episodes": 2,
         "model": {"dim": 16, "depth": 1, "heads": 2},
         "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "log_every": 10,
                   "checkpoint_every": 20},
         "eval": {"every": 20, "episodes": 2},
         "mesh": {"data": 1},  # one device of the eight fake ones: fewer, smaller programs
         "max_steps": 100}  # reach's expert needs about 50; an untrained policy fails in 100, not 500


def test_micro_study_writes_the_contract_and_reuses_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOLL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(mp.PRESETS, "micro", MICRO)
    out = tmp_path / "out"
    mp.reproduce("micro", out, progress=False)

    saved = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["demos"], r["objective"], r["seed"]) for r in saved["runs"]] == [
        ("reach-v3", 3, "ddpm", 0), ("reach-v3", 3, "flow", 0)]
    types = {"task": str, "demos": int, "objective": str, "seed": int, "success": float, "expert_success": float}
    for r in saved["runs"]:
        for key, kind in types.items():
            assert type(r[key]) is kind, (key, r[key])
        assert 0.0 <= r["success"] <= 1.0 and r["eval_episodes"] == 2
        assert r["expert_success"] == 1.0  # reach's expert on episodes 0, 1 of seed 1000
        assert 0.0 < r["expert_success_demos"] <= 1.0
    expert = json.loads((out / "expert" / "reach-v3-s1000-n2-m100.json").read_text())
    assert (expert["episodes"], expert["seed"]) == (2, 1000)  # the policies' own evaluation episodes
    config = json.loads((out / "runs" / "reach-v3-ddpm-d3-s0" / "config.json").read_text())
    assert (config["eval"]["seed"], config["eval"]["final_episodes"], config["data"]["seed"]) == (1000, 2, 0)
    assert (config["objective"]["kind"], config["objective"]["sampler"]) == ("ddpm", "ddim")

    md = (out / "results.md").read_text()
    assert "| reach-v3 | 3 | ddpm | 1 |" in md and "| reach-v3 | 3 | flow | 1 |" in md
    assert "Smoke test, not a result" in md and "90.9" in md and "83.6" in md
    assert "criterion is not measured" in md  # no 50-demo runs here
    assert (out / "success.png").stat().st_size > 5_000

    # A rerun trains nothing: the finished runs' summaries are reused untouched.
    summaries = sorted((out / "runs").glob("*/summary.json"))
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    again = mp.reproduce("micro", out, progress=False)
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes
    assert again["runs"] == saved["runs"]

    # Another preset into the same --out stops before touching anything.
    monkeypatch.setitem(mp.PRESETS, "other", {**MICRO, "train": {**MICRO["train"], "steps": 30}})
    with pytest.raises(mp.ReproductionError, match="train.steps"):
        mp.reproduce("other", out, progress=False)
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes


def test_demo_subsets_are_prefixes_of_one_generated_set(tmp_path, monkeypatch):
    from atoll.data import demos as demos_lib

    monkeypatch.setenv("ATOLL_CACHE", str(tmp_path / "cache"))
    paths, meta = mp.task_demos("reach-v3", (2, 3), tmp_path, progress=False)
    small, large = demos_lib.load_demos(paths[2]), demos_lib.load_demos(paths[3])
    assert (small.num_episodes, large.num_episodes) == (2, 3)
    end = int(small.episode_ends_E[-1])
    assert (small.obs_ND == large.obs_ND[:end]).all() and (small.actions_NA == large.actions_NA[:end]).all()
    assert meta["num_demos"] == 3 and meta["seed"] == 0 and "expert_success_rate" in meta
    assert list((tmp_path / "cache" / "demos").glob("reach-v3-s0-n3*.npz"))  # generated once, in ATOLL_CACHE


def test_unknown_tasks_get_one_message_naming_them_all(tmp_path):
    with pytest.raises(mp.ReproductionError, match="reachh.*pushy"):
        mp.reproduce("ci", tmp_path / "out", tasks=["reachh", "pushy"], progress=False)
    assert not (tmp_path / "out").exists()
    assert mp.resolve_tasks(["reach", "reach-v3", "push_v3"]) == ["reach-v3", "push-v3"]


def test_aggregate_and_acceptance():
    def row(task, demos, objective, seed, success, expert):
        return {"task": task, "demos": demos, "objective": objective, "seed": seed, "success": success,
                "expert_success": expert}

    rows = [row("reach-v3", 50, "flow", s, x, 1.0) for s, x in enumerate((0.9, 1.0, 0.8))]
    rows += [row("push-v3", 50, "flow", s, x, 0.5) for s, x in enumerate((0.5, 0.4, 0.6))]
    rows += [row("pick-place-v3", 50, "flow", 0, 0.2, 0.0)]
    agg = mp.aggregate(rows)
    reach = next(c for c in agg["cells"] if c["task"] == "reach-v3")
    assert reach["success_mean"] == pytest.approx(0.9) and reach["success_std"] == pytest.approx(0.0816, abs=1e-4)
    assert reach["ratio"] == pytest.approx(0.9) and reach["seeds"] == [0, 1, 2]
    (avg,) = agg["averages"]
    assert avg["ratio_mean"] == pytest.approx((0.9 + 1.0) / 2)  # pick-place: the expert never succeeded, no ratio
    assert avg["tasks_without_expert_success"] == ["pick-place-v3"]
    (acc,) = mp.acceptance(agg)
    assert acc["holds"] and not acc["covers_mt10"] and acc["ratio"] == pytest.approx(0.95)
    assert mp.acceptance(agg, threshold=0.96)[0]["holds"] is False
    assert mp.acceptance(agg, demos=10) == []
    assert mp.config_differences({"train": {"steps": 1}, "seed": 0}, {"train": {"steps": 2}, "seed": 1}) == [
        "seed", "train.steps"]
    # a run saved before policy.frozen_policy / self_condition_steps existed is still this preset's
    old = {"policy": {"conditioning": "none"}, "data": {"path": "/elsewhere/demos.npz"}}
    now = {"policy": {"conditioning": "none", "frozen_policy": "", "self_condition_steps": 0}, "data": {}}
    assert mp.config_differences(mp._comparable(old), mp._comparable(now)) == []


def test_plan_puts_whole_seeds_of_the_criterion_first():
    preset = {**mp.PRESETS["full"], "tasks": ("reach-v3", "push-v3")}
    order = [(r["demos"], r["seed"], r["task"], r["objective"]) for r in mp.plan(preset, preset["tasks"])]
    assert len(order) == len(set(order)) == 2 * 2 * 2 * 3
    assert order[:4] == [(50, 0, "reach-v3", "ddpm"), (50, 0, "reach-v3", "flow"), (50, 0, "push-v3", "ddpm"),
                         (50, 0, "push-v3", "flow")]
    assert {o[0] for o in order[:12]} == {50} and [o[1] for o in order[:12]] == sorted(o[1] for o in order[:12])
    row = {"task": "reach-v3", "demos": 50, "objective": "flow", "seed": 0, "success": 1.0, "expert_success": 1.0,
           "expert_success_demos": 1.0}
    results = {"runs": [row], "preset": "full", "planned_runs": 24, "aggregate": mp.aggregate([row]),
               "setting": {"eval_episodes": 50, "max_steps": 500, "train_steps": 3000}, "acceptance": [],
               "easy_average": []}
    assert "Partial: 1 of the 24 runs" in mp.results_markdown(results)
    results["acceptance"] = mp.acceptance(results["aggregate"])
    assert "criterion holds so far (1 of 24 runs done)" in mp.results_markdown(results)
    assert "Partial" not in mp.results_markdown({**results, "planned_runs": 1})
