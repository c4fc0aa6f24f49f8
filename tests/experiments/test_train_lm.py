import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from atoll.configs import lm
from atoll.configs.validation import ConfigError
from atoll.experiments import outputs
from atoll.experiments.train_lm import train
from atoll.parallel import checkpoint


def small_config(**train_overrides):
    c = lm.get_config("tiny")
    c.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    c.data.seq_len = 32
    c.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=5, eval_every=10, eval_batches=1,
                   checkpoint_every=5)
    c.train.update(**train_overrides)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """small_config() trained 20 steps straight, and the same run stopped at step 10
    (checkpoints 5 and 10): one engine, compiled once; tests read these or resume copies."""
    root = tmp_path_factory.mktemp("runs")
    c = small_config()
    straight = train(c, root / "straight", progress=False)
    first = train(c, root / "split10", stop_at_step=10, progress=False)
    return SimpleNamespace(root=root, straight=straight, first=first)


def _copy_run(runs, name: str, tmp_path) -> Path:
    return Path(shutil.copytree(runs.root / name, tmp_path / name))


def test_loss_decreases_on_the_corpus(tmp_path):
    c = small_config(steps=60, eval_every=30, log_every=10, lr=3e-3)
    result = train(c, tmp_path / "run", progress=False)
    rows = outputs.read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert losses[0] > 3.5  # started near uniform over 256 bytes (5.5 nats)
    s = result.summary
    assert s["val_bits_per_byte"] < 6.0, s  # uniform over bytes is 8 bits; the unigram bar is ~4.6
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert any((tmp_path / "run" / "tb").iterdir())
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"val_bits_per_byte", "unigram_bits_per_byte", "tokens_per_sec"} <= set(saved)
    assert all(r["learning_rate"] > 0 for r in rows if "learning_rate" in r)


def test_resume_is_exact(runs, tmp_path):
    """2k steps straight == k steps, stop, resume for k more: identical params."""
    c = small_config()
    straight, first = runs.straight, runs.first
    assert first.summary["step"] == 10 and not first.summary["finished"]
    resumed = _copy_run(runs, "split10", tmp_path)
    second = train(c, resumed, progress=False)
    assert second.summary["step"] == 20 and second.summary["finished"]
    leaves_a = jax.tree.leaves(straight.state)
    leaves_b = jax.tree.leaves(second.state)
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in outputs.read_metrics(resumed)]
    assert steps == sorted(set(steps)), "a resumed run must not duplicate metric rows"
    # Rerunning a finished run trains nothing and keeps its params.
    third = train(c, resumed, progress=False)
    for a, b in zip(leaves_b, jax.tree.leaves(third.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_a_different_model_is_refused_and_loses_nothing(runs, tmp_path):
    run = _copy_run(runs, "straight", tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    c = small_config()
    c.model.d_model = 64
    with pytest.raises(ConfigError, match=r"model\.d_model: 32 -> 64"):
        train(c, run, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_onto_another_mesh(runs, tmp_path):
    run = _copy_run(runs, "split10", tmp_path)  # saved on data 2 × fsdp 2 × tensor 2
    c = small_config()
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    result = train(c, run, progress=False)
    assert result.summary["step"] == 20 and result.summary["mesh"]["data"] == 8


def _cli(*args, cwd):
    # ATOLL_XLA_DEFAULTS=0: the CLI keeps this process's XLA_FLAGS (the defaults only tune GPUs), so its
    # programs share the persistent compilation cache with the runs trained here
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               ATOLL_XLA_DEFAULTS="0")
    return subprocess.run([sys.executable, "-m", "atoll.experiments.train_lm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_bad_config_fails_naming_the_field(tmp_path):
    config = os.path.join(os.getcwd(), "atoll/configs/lm.py:tiny")
    out = _cli(f"--config={config}", f"--workdir={tmp_path}/w", "--config.model.dtype=bf17", cwd=tmp_path)
    assert out.returncode == 2
    assert "config.model.dtype = 'bf17' is not allowed" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli(f"--config={config}", f"--workdir={tmp_path}/w", "--config.mesh.data=3", cwd=tmp_path)
    assert out.returncode == 2 and "needs 3 devices but 8 are available" in out.stderr
    out = _cli(f"--config={config}", f"--workdir={tmp_path}/w", "--config.model.no_such_field=1", cwd=tmp_path)
    assert out.returncode != 0 and "no_such_field" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


# small_config() as command-line flags
SMALL_FLAGS = (
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
    "--config.data.seq_len=32", "--config.train.steps=20", "--config.train.batch_size=8",
    "--config.train.warmup_steps=2", "--config.train.log_every=5", "--config.train.eval_every=10",
    "--config.train.eval_batches=1", "--config.train.checkpoint_every=5", "--config.mesh.data=2",
    "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
)


def test_cli_trains_and_reports_and_a_new_process_resumes_to_the_same_params(runs, tmp_path):
    """The CLI trains and reports; 20 steps straight (the module's run, in this process) ==
    10 steps in one CLI process, exit, a new process restores and trains 10 more (lazy
    saves); the CLI processes see this one's 8 devices."""
    config = os.path.join(os.getcwd(), "atoll/configs/lm.py:tiny")
    common = (f"--config={config}", *SMALL_FLAGS, "--progress=false")
    for args in ((f"--workdir={tmp_path}/split", "--stop_at_step=10"), (f"--workdir={tmp_path}/split",)):
        out = _cli(*common, *args, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "bits per byte" in out.stdout and "unigram bar" in out.stdout, out.stdout
    assert "resuming split from its checkpoint at step 10" in out.stdout
    assert json.loads((tmp_path / "split" / "config.json").read_text()) == \
        json.loads((runs.root / "straight" / "config.json").read_text())  # the same run as the reference
    a = checkpoint.read_on_host(runs.root / "straight" / "checkpoints", 20)
    b = checkpoint.read_on_host(tmp_path / "split" / "checkpoints", 20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("field,value,message", [
    ("model.remat", "sometimes", "config.model.remat = 'sometimes' is not allowed"),
    ("model.num_kv_heads", 3, "config.model.num_kv_heads = 3 must divide config.model.num_heads = 4"),
    ("train.lr", -1.0, "config.train.lr = -1.0 must be a positive number"),
    ("data.val_fraction", 0.9, "config.data.val_fraction = 0.9 must lie in"),
    ("model.attention_impl", "pallas", "config.model.attention_impl = 'pallas' needs model.dtype bfloat16"),
    ("model.context_parallel", "ringg", "config.model.context_parallel = 'ringg' is not allowed"),
])
def test_validation_names_the_field(field, value, message):
    c = lm.get_config("tiny")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        lm.validate(c)


def test_pallas_attention_refuses_a_multi_device_mesh(tmp_path):
    c = small_config()
    c.model.update(dtype="bfloat16", head_dim=64)
    c.model.attention_impl = "pallas"
    lm.validate(c)
    c.mesh.update(data=2)
    with pytest.raises(ConfigError, match="needs config.model.context_parallel"):
        train(c, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_variant_validates():
    for variant in lm.VARIANTS:
        lm.validate(lm.get_config(variant))
    with pytest.raises(ValueError, match="unknown lm config variant"):
        lm.get_config("huge")


def test_a_damaged_latest_checkpoint_stops_the_run_unless_latest_valid(runs, tmp_path):
    c = small_config(keep_checkpoints=3)
    run = _copy_run(runs, "split10", tmp_path)  # checkpoints at 5 and 10
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "5"]
    for f in (run / "checkpoints" / "10" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"step 10 .* damaged.*latest_valid"):
        train(c, run, progress=False)
    result = train(c, run, progress=False, restore="latest_valid")
    assert result.summary["step"] == 20 and result.summary["finished"]
    steps = [r["step"] for r in outputs.read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert (run / "checkpoints" / "10.damaged").is_dir()  # set aside, not deleted


def test_a_workdir_saved_before_moe_configs_existed_still_matches_its_dense_config(tmp_path):
    from atoll.experiments.train_lm import _check_workdir_config

    c = small_config()
    saved = json.loads(c.to_json_best_effort())
    del saved["model"]["moe"]  # config.json as runs wrote it before config.model.moe
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _check_workdir_config(tmp_path, c)  # the same dense model: accepted
    c.model.moe.num_experts = 4
    with pytest.raises(ConfigError, match="different model"):
        _check_workdir_config(tmp_path, c)


def test_pallas_grouped_matmul_is_checked_and_refuses_a_multi_device_mesh(tmp_path):
    c = small_config()
    c.model.moe.update(num_experts=4, top_k=2, dispatch="dropless", grouped_matmul_impl="pallas")
    with pytest.raises(ConfigError, match="needs model.dtype bfloat16 or float16"):
        lm.validate(c)
    c.model.update(dtype="bfloat16", d_model=64, mlp_dim=128)
    lm.validate(c)
    c.model.moe.dispatch = "capacity"
    with pytest.raises(ConfigError, match="set config.model.moe.dispatch = 'dropless'"):
        lm.validate(c)
    c.model.moe.dispatch = "dropless"
    c.mesh.update(island=8, data=1, fsdp=1, tensor=1)  # one device per island (a split batch is refused anyway)
    c.outer.method = "diloco"
    with pytest.raises(ConfigError, match="grouped_matmul_impl = 'pallas' on a mesh of 8 devices"):
        train(c, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
