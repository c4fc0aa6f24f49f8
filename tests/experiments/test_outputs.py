"""What a run leaves in its workdir: the plots."""

import json

import matplotlib

from atoll.experiments import outputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_loss_writes_a_png_and_leaves_the_callers_backend_alone(tmp_path):
    # A notebook's inline backend must survive train_lm / train_policy drawing
    # their plots: stand in for it with a non-Agg backend.
    original = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        before = matplotlib.get_backend()
        rows = [{"step": 0, "loss": 3.0}, {"step": 5, "loss": 2.5, "val_loss": 2.6}, {"step": 10, "loss": 2.2}]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = outputs.plot_loss(tmp_path, unit="bits/byte", scale=1.0, bar=2.0, bar_label="target")
        assert matplotlib.get_backend() == before
    finally:
        matplotlib.use(original)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 5_000
