"""The quickstart notebook runs end to end (at a tiny size)."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOLL_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("ATOLL_NOTEBOOK_LAYERS", "1")
    monkeypatch.setenv("ATOLL_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "colab" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bits per byte" in text
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    sample = "".join(o.get("text", "") for o in last.outputs)
    assert sample.startswith("def ") and len(sample) > len("def ") + 20, sample  # the prompt and its continuation
    assert (tmp_path / "run" / "summary.json").exists()


def test_low_communication_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOLL_NOTEBOOK_STEPS", "8")
    monkeypatch.setenv("ATOLL_NOTEBOOK_LAYERS", "2")
    monkeypatch.setenv("ATOLL_NOTEBOOK_H", "4")
    monkeypatch.setenv("ATOLL_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "colab" / "low_communication.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    table = "".join(o.get("text", "") for o in [c for c in nb.cells if c.cell_type == "code"][-1].outputs)
    assert "ddp" in table and "diloco H=4" in table and "streaming fp4 H=4" in table, table
    for name in ("ddp", "diloco_H4", "streaming_fp4_H4"):
        assert (tmp_path / "runs" / name / "summary.json").exists(), name
