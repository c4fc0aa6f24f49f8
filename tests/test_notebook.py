"""The notebooks run end to end (at a tiny size, through their ATOLL_NOTEBOOK_* variables)."""

import json
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _run_notebook(name: str, tmp_path: Path, monkeypatch, **env: str) -> list:
    """Executes colab/<name> in a fresh kernel; returns its code cells with outputs."""
    for k, v in env.items():
        monkeypatch.setenv(f"ATOLL_NOTEBOOK_{k}", v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cells) -> str:
    return "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))


def _cpu_devices(monkeypatch, count: int) -> None:
    """`count` CPU devices in the kernel, not the suite's 8: on 2 cores every extra
    fake device only costs compile and step time."""
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", str(count))
    monkeypatch.setenv("XLA_FLAGS", re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                           os.environ.get("XLA_FLAGS", "")).strip())


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    _cpu_devices(monkeypatch, 1)  # as in Colab
    # A small batch and window: on the CPU with XLA's optimizations off, running the
    # steps, the evaluations and the sampling (one forward per byte) costs as much as compiling.
    cells = _run_notebook("quickstart.ipynb", tmp_path, monkeypatch, STEPS="6", LAYERS="1", BATCH="8",
                          SEQ_LEN="32", SAMPLE_BYTES="48", WORKDIR=str(tmp_path / "run"))
    assert "[CpuDevice(id=0)]" in _text(cells)
    assert "bits per byte" in _text(cells)
    sample = _text(cells[-1:])
    assert sample.startswith("def ") and len(sample) > len("def ") + 20, sample  # the prompt and its continuation
    assert (tmp_path / "run" / "summary.json").exists()


def test_low_communication_notebook_runs(tmp_path, monkeypatch):
    _cpu_devices(monkeypatch, 4)  # one per island, as the notebook asks for on a CPU
    # DDP and streaming (fragments, fp4): plain DiLoCo runs the same island path as streaming and
    # is the reproduction test's; a third compile set would cost a third of this test.
    cells = _run_notebook("low_communication.ipynb", tmp_path, monkeypatch, STEPS="8", LAYERS="2", H="4",
                          EVALS="2", BATCH="8", SEQ_LEN="32", RUNS="ddp,streaming", WORKDIR=str(tmp_path / "runs"))
    assert "CpuDevice(id=3)]" in _text(cells[:2]), _text(cells[:2])[:300]
    table = _text(cells[-1:])
    assert "ddp" in table and "streaming fp4 H=4" in table and "diloco H=4" not in table, table
    for name in ("ddp", "streaming_fp4_H4"):
        assert (tmp_path / "runs" / name / "summary.json").exists(), name


def test_robot_policy_notebook_runs(tmp_path, monkeypatch):
    # One CPU device in the kernel, as in Colab: replicating the rollouts and the
    # checkpoint over the suite's 8 fake devices only costs time on 2 cores.
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
    monkeypatch.setenv("XLA_FLAGS", re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                           os.environ.get("XLA_FLAGS", "")).strip())
    cells = _run_notebook("robot_policy.ipynb", tmp_path, monkeypatch, VARIANT="tiny", STEPS="60", EPISODES="16",
                          SWEEP="2", WORKDIR=str(tmp_path / "run"))
    text = _text(cells)
    assert "[CpuDevice(id=0)]" in text, text[:200]
    assert "finished at step 60" in text and "policy: success" in text and "expert: success" in text, text
    assert "s = 2: success" in text, _text(cells[-1:])
    figures = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 4, [list(o.get("data", {})) for c in cells for o in c.get("outputs", [])]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 60 and summary["eval_episodes"] == 16 and 0.0 <= summary["success"] <= 1.0
