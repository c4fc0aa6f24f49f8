"""Checkpoints: bit-exact round trips in every save mode, restores onto other
meshes, retention, damage detection, background errors, and a process killed
in the middle of a save (real subprocess)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from atoll.configs import lm
from atoll.core import outer
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.parallel import checkpoint, islands, mesh as mesh_lib, train_state

SEQ = 16
ROOT = Path(__file__).resolve().parents[2]


def tiny_model():
    c = lm.get_config("tiny")
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    return Transformer(TransformerConfig.from_dict(c.model))


def lm_state(mesh, seed=0):
    model, tx = tiny_model(), optax.adamw(1e-3)
    sh = train_state.state_shardings(model, tx, mesh, SEQ)
    state = train_state.init_state(model, tx, mesh, SEQ, jax.random.key(seed), sh)
    return state, train_state.abstract_state(model, tx, SEQ, sh)


@pytest.fixture(scope="module")
def states():
    """(state, its abstract state, another state of seed 2) on a data-8 mesh: initialized
    once for the tests that save and restore them (none changes them)."""
    mesh = mesh_lib.make_mesh({"data": 8})
    state, abstract = lm_state(mesh)
    return state, abstract, lm_state(mesh, seed=2)[0]


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bit_exact(a, b):
    la, lb = (t if isinstance(t, list) else host(t) for t in (a, b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


@pytest.fixture(scope="module")
def island_trainer():
    mesh = mesh_lib.make_mesh({"island": 4, "data": 2})
    spec = outer.OuterSpec(method="streaming_diloco", H=4, lr=0.4, momentum=0.9, fragments=2, tau=1)
    return islands.IslandTrainer(tiny_model(), optax.adamw(3e-3), spec, mesh, SEQ)  # compiled once, used per mode


@pytest.mark.parametrize("mode", checkpoint.SAVE_MODES)
def test_island_state_round_trip_is_bit_exact(tmp_path, mode, island_trainer):
    """Every leaf: islands' params and AdamW moments, outer params, momentum, in-flight Δ, step."""
    tr = island_trainer
    state = tr.init(jax.random.key(1))
    rng = np.random.default_rng(0)
    for i in range(1, 4):  # islands apart, a fragment sent and in flight
        state, _ = tr.step_fn(state, tr.put_batch(rng.integers(0, 256, (16, SEQ + 1)).astype(np.int32)))
        state, _, _ = tr.after_step(state, i)
    expected = host(state)
    ck = checkpoint.Checkpointer(tmp_path, mode=mode)
    ck.save(3, state, {"data": {"position": 7}})
    # the next step donates `state`'s buffers: the checkpoint must still hold step 3
    state, _ = tr.step_fn(state, tr.put_batch(rng.integers(0, 256, (16, SEQ + 1)).astype(np.int32)))
    ck.wait()
    restored, extra = ck.restore(3, tr.abstract_state())
    ck.close()
    assert extra == {"data": {"position": 7}}
    assert_bit_exact(restored, expected)


def test_restores_onto_other_meshes_and_device_counts(tmp_path):
    state, _ = lm_state(mesh_lib.make_mesh({"data": 4, "fsdp": 2}))
    ck = checkpoint.Checkpointer(tmp_path, mode="sync")
    ck.save(5, state, {})
    devices, model, tx = jax.devices(), tiny_model(), optax.adamw(1e-3)
    for sizes, devs in (({"fsdp": 8}, devices), ({"data": 2, "fsdp": 2}, devices[:4]), ({"data": 1}, devices[:1])):
        mesh = mesh_lib.make_mesh(sizes, devs)
        abstract = train_state.abstract_state(model, tx, SEQ, train_state.state_shardings(model, tx, mesh, SEQ))
        restored, _ = ck.restore(5, abstract)
        assert_bit_exact(restored, state)
        leaf = jax.tree.leaves(restored["params"])[0]
        assert len(leaf.sharding.device_set) == len(devs)
    ck.close()


def test_retention_keeps_the_newest_and_every_kth(tmp_path, caplog):
    state = {"w": jax.numpy.zeros(8)}
    ck = checkpoint.Checkpointer(tmp_path, keep=2, keep_every=4, mode="async")
    for step in range(1, 11):
        ck.save(step, state, {})
    ck.wait()
    assert ck.all_steps() == [4, 8, 9, 10]
    ck.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 8, 9, 10]
    # read back without a trainer, and without orbax's warning about the step metadata one level up
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(checkpoint.read_on_host(tmp_path, 8)["w"], np.zeros(8))
    assert not [r for r in caplog.records if "Metadata file" in r.getMessage()], caplog.text


def _array_files(step_dir: Path) -> list[Path]:
    """The files holding array chunks (OCDBT data files, per process and merged)."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_named_and_latest_valid_falls_back(tmp_path, damage, states):
    state, abstract, state2 = states
    ck = checkpoint.Checkpointer(tmp_path, keep=3, mode="sync")
    ck.save(1, state, {"at": 1})
    ck.save(2, state2, {"at": 2})
    files = _array_files(tmp_path / "2")
    assert files
    for target in files:
        data = bytearray(target.read_bytes())
        if damage == "truncate":
            target.write_bytes(bytes(data[: len(data) // 2]))
        else:  # one bit in the middle of each file
            data[len(data) // 2] ^= 0x10
            target.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .* damaged"):
        ck.restore(2, abstract)
    skipped = []
    step, restored, extra = ck.restore_latest_valid(abstract, log=skipped.append)
    assert step == 1 and extra == {"at": 1} and "step 2" in skipped[0]
    assert_bit_exact(restored, state)
    ck.close()


def test_a_different_model_is_reported_as_such_not_as_damage(tmp_path, states):
    state = states[0]
    ck = checkpoint.Checkpointer(tmp_path, mode="sync")
    ck.save(1, state, {})
    wider = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (s.shape[-1] * 2,), s.dtype)
                         if s.ndim == 2 else s, jax.eval_shape(lambda: state))
    with pytest.raises(checkpoint.CheckpointError, match="different model"):
        ck.restore(1, wider)
    ck.close()


@pytest.mark.parametrize("mode", ["lazy", "async"])
def test_a_failed_background_save_stops_the_loop(tmp_path, monkeypatch, mode, states):
    state = states[0]
    ck = checkpoint.Checkpointer(tmp_path, mode=mode)
    ck.save(1, state, {})
    ck.wait()

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    if mode == "lazy":  # the write runs in atoll's thread
        monkeypatch.setattr(ck._manager, "save", disk_full)
    else:  # the write runs in orbax's finalize thread: fail it there
        monkeypatch.setattr(ck._manager, "_finalize_checkpoint", disk_full)
    ck.save(2, state, {})
    with pytest.raises(checkpoint.CheckpointError, match="No space left"):
        for _ in range(200):  # the loop's per-step check, or the next save, raises it
            ck.check()
            time.sleep(0.02)
        ck.wait()
    if mode == "lazy":  # (orbax's finalize fails after the step's files are complete)
        assert checkpoint.Checkpointer(tmp_path).all_steps() == [1]


_SAVER = """
import sys, time, jax, jax.numpy as jnp
from atoll.parallel import checkpoint
ck = checkpoint.Checkpointer(sys.argv[1], mode="sync")
small = {"w": jnp.arange(1000.0)}
ck.save(1, small, {"step": 1})
big = {"w": jnp.ones((96, 1024, 1024), jnp.float32)}  # 384 MB: a write that takes a while
print("saving", flush=True)
ck.save(2, big, {"step": 2})
print("saved", flush=True)
"""


def test_a_process_killed_mid_save_leaves_the_previous_step_restorable(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "saving"
    deadline = time.monotonic() + 60
    while not any(".orbax-checkpoint-tmp" in q.name for q in tmp_path.iterdir()):
        assert time.monotonic() < deadline and p.poll() is None, "the save finished before it could be killed"
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ck = checkpoint.Checkpointer(tmp_path, mode="sync")  # starts cleaning the partial step away
    assert ck.all_steps() == [1]
    deadline = time.monotonic() + 20
    while any("tmp" in q.name for q in tmp_path.iterdir()):
        assert time.monotonic() < deadline, sorted(q.name for q in tmp_path.iterdir())
        time.sleep(0.05)
    restored, extra = ck.restore(1, {"w": jax.ShapeDtypeStruct((1000,), np.float32)})
    assert extra == {"step": 1} and float(np.asarray(restored["w"])[999]) == 999.0
    ck.close()


def test_the_readme_loads_params_with_orbax_alone(tmp_path, states):
    state = states[0]
    ck = checkpoint.Checkpointer(tmp_path / "checkpoints", mode="sync")
    ck.save(400, state, {})
    ck.close()
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"runs/tiny/checkpoints/400/state"', repr(str(tmp_path / "checkpoints/400/state")))
    snippet += "\nnp.save('params_embedding.npy', params['embedding'])\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no atoll on the path
    run = subprocess.run([sys.executable, "-c", "import sys; sys.modules['atoll'] = None\n" + snippet],
                         cwd=tmp_path, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "params_embedding.npy"), np.asarray(state["params"]["embedding"]))
