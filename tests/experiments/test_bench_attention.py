import json
import os
import subprocess
import sys

import pytest
from absl import app

from atoll.experiments.bench import attention as bench
from atoll.kernels.attention import BlockSizes

# The run below: B, H, D and the sequence lengths, and the max_err cap (S=256 is above it).
B, H, D, SEQ_LENS, CAP = 1, 2, 64, (128, 256), 128
LEADING = ["impl", "S", "D", "causal", "pass", "tflops", "ratio_to_cudnn", "max_err"]


def hand_flops(S: int, causal: bool, pass_: str) -> float:
    """4·B·S²·H·D for the forward (two matmuls, 2 FLOPs per multiply-add), halved for
    causal; the forward+backward is 3.5 forwards."""
    fwd = 4 * B * S * S * H * D
    if causal:
        fwd /= 2
    return fwd * 3.5 if pass_ == "fwd+bwd" else fwd


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("bench_attention") / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # the contract, not the speed: compile fast
               JAX_PLATFORMS="cpu")
    # cuDNN is asked for and, on the CPU, skipped; Pallas is left out (its CPU interpreter is slow).
    out = subprocess.run(
        [sys.executable, "-m", "atoll.experiments.bench.attention", "--impls=xla,cudnn", f"--batch={B}",
         f"--heads={H}", f"--head_dims={D}", f"--seq_lens={','.join(map(str, SEQ_LENS))}", "--causal=false,true",
         "--repeats=2", "--warmup=1", f"--max_err_seq_cap={CAP}", f"--out={out_path}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines], out.stderr, lines, out_path.read_text().splitlines()


def test_rows_are_xla_only_with_the_contract_keys_first(output):
    parsed, stderr, _, _ = output
    rows = parsed[:-1]
    assert {(r["impl"], r["S"], r["D"], r["causal"], r["pass"]) for r in rows} == {
        ("xla", S, D, causal, pass_) for S in SEQ_LENS for causal in (False, True) for pass_ in ("fwd", "fwd+bwd")}
    assert len(rows) == 8
    for r in rows:
        assert list(r)[:8] == LEADING
        assert r["ratio_to_cudnn"] is None  # cuDNN did not run
        assert (r["B"], r["H"], r["dtype"]) == (B, H, "bfloat16") and r["device"] and r["jax"]
    assert "skipping cudnn: cuDNN needs a GPU" in stderr


def test_tflops_follow_the_flops_convention(output):
    rows = output[0][:-1]
    for r in rows:
        flops = hand_flops(r["S"], r["causal"], r["pass"])
        assert r["flops"] == flops
        assert r["time_s"] > 0 and r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
        assert r["tflops"] == pytest.approx(flops / r["time_s"] / 1e12, rel=1e-12)
    by = {(r["S"], r["causal"], r["pass"]): r for r in rows}
    for S in SEQ_LENS:
        for pass_ in ("fwd", "fwd+bwd"):
            assert by[S, True, pass_]["flops"] * 2 == by[S, False, pass_]["flops"]  # causal: half
        assert by[S, False, "fwd+bwd"]["flops"] == 3.5 * by[S, False, "fwd"]["flops"]


def test_max_err_of_the_reference_itself_is_bf16_rounding(output):
    rows = output[0][:-1]
    for r in rows:
        # xla in bf16 against itself in fp32: only the bf16 rounding of the output / gradients.
        assert r["max_err"] is not None and 0 <= r["max_err"] < 0.05, r
        assert r["max_err_S"] == min(r["S"], CAP)
    by = {(r["S"], r["causal"], r["pass"]): r for r in rows}
    for causal in (False, True):
        for pass_ in ("fwd", "fwd+bwd"):  # S=256 is above the cap: measured at S=128, the same number
            assert by[256, causal, pass_]["max_err"] == by[128, causal, pass_]["max_err"]


def test_summary_table_and_out_file(output):
    parsed, stderr, lines, file_lines = output
    rows, summary = parsed[:-1], parsed[-1]
    assert summary["summary"] == "attention"
    for causal in ("noncausal", "causal"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert summary[f"xla_vs_cudnn_{pass_}_D{D}_{causal}_S256"] is None  # no cuDNN on the CPU
    assert summary["device"] == rows[0]["device"] and summary["jax"] == rows[0]["jax"] and summary["date"]
    assert summary["skipped"] == ["skipping cudnn: cuDNN needs a GPU, the backend is cpu"]
    assert "TFLOP/s (x cuDNN)" in stderr and stderr.count(" fwd+bwd | ") == 4  # one table line per configuration
    assert not any(line.startswith("{") for line in stderr.splitlines())  # the table is not on stdout
    assert file_lines == lines


# ------------------------------------------------------------------ the pure helpers (no subprocess)


def test_ratio_math_with_pallas_like_timings():
    tuned = bench.block_sizes_name(BlockSizes(block_q=64, block_kv=64, stages=3))
    assert tuned == "pallas[bq64,bkv64,st3]"
    times = {"cudnn": [2.0, 1.0, 3.0], "pallas": [1.0, 5.0, 1.0], tuned: [4.0, 4.0, 4.0]}  # medians 2, 1, 4
    errors = {"cudnn": (0.01, 128), "pallas": (0.02, 128), tuned: (float("nan"), 128)}
    extras = {"pallas": {"block_sizes": {"block_q": 64}}}
    rows = bench.config_rows(256, 128, True, "fwd+bwd", 2, 4, times, errors, extras)
    flops = 4 * 2 * 256**2 * 4 * 128 / 2 * 3.5
    by = {r["impl"]: r for r in rows}
    assert [list(r)[:8] for r in rows] == [LEADING] * 3
    assert by["cudnn"]["tflops"] == flops / 2.0 / 1e12 and by["cudnn"]["ratio_to_cudnn"] == 1.0
    assert by["pallas"]["tflops"] == flops / 1.0 / 1e12 and by["pallas"]["ratio_to_cudnn"] == pytest.approx(2.0)
    assert by[tuned]["ratio_to_cudnn"] == pytest.approx(0.5)
    assert by["pallas"]["max_err"] == 0.02 and by["pallas"]["block_sizes"] == {"block_q": 64}
    assert by[tuned]["max_err"] is None and by[tuned]["max_err_nonfinite"]  # NaN is not JSON
    json.dumps(rows, allow_nan=False)
    # Without cuDNN in the configuration there is no ratio.
    alone = bench.config_rows(256, 128, True, "fwd", 2, 4, {"pallas": [1.0]}, {})
    assert alone[0]["ratio_to_cudnn"] is None and alone[0]["max_err"] is None

    # The summary takes the largest S where both ran.
    def fake(impl, S, ratio, pass_="fwd"):
        return {"impl": impl, "S": S, "D": 128, "causal": True, "pass": pass_, "ratio_to_cudnn": ratio}

    summary = bench.summary_ratios(
        [fake("cudnn", 2048, 1.0), fake("pallas", 2048, 1.1), fake("pallas", 4096, 1.2), fake("pallas", 8192, None),
         fake("pallas", 2048, None, "fwd+bwd")], ["xla", "cudnn", "pallas"], [128], [True])
    assert summary == {"xla_vs_cudnn_fwd_D128_causal": None, "pallas_vs_cudnn_fwd_D128_causal_S4096": 1.2,
                       "xla_vs_cudnn_fwd+bwd_D128_causal": None, "pallas_vs_cudnn_fwd+bwd_D128_causal_S2048": None}


def test_flops_convention():
    assert bench.attention_flops(4, 2048, 16, 128, False, "fwd") == 4 * 4 * 2048**2 * 16 * 128
    assert bench.attention_flops(4, 2048, 16, 128, True, "fwd") == 2 * 4 * 2048**2 * 16 * 128
    assert bench.attention_flops(4, 2048, 16, 128, True, "fwd+bwd") == 3.5 * 2 * 4 * 2048**2 * 16 * 128


def parse(**overrides):
    args = dict(impls=["xla", "cudnn", "pallas"], batch=4, heads=16, head_dims=["128", "64"],
                seq_lens=["2048", "4096"], causal=["false", "true"], repeats=10, warmup=2, max_err_seq_cap=4096,
                pallas_block_sizes=None)
    return bench.parse_settings(**{**args, **overrides})


def test_flags_are_validated():
    s = parse()
    assert list(s.impls) == ["xla", "cudnn", "pallas"] and s.impls["pallas"] == ("pallas", None)
    assert s.head_dims == (128, 64) and s.seq_lens == (2048, 4096) and s.causals == (False, True)
    tuned = parse(pallas_block_sizes='[{"block_q": 64, "block_kv": 128}, {"block_q": 128, "stages": 3, '
                                     '"block_kv_bwd": 128}]')
    assert list(tuned.impls) == ["xla", "cudnn", "pallas[bq64,bkv128,st2]", "pallas[bq128,bkv128,st3,bkvb128]"]
    assert tuned.impls["pallas[bq64,bkv128,st2]"] == ("pallas", BlockSizes(block_q=64, block_kv=128))
    for bad, message in ((dict(impls=["xla", "flash"]), "--impls"), (dict(heads=0), "--heads"),
                         (dict(batch=-1), "--batch"), (dict(head_dims=["64", "0"]), "--head_dims"),
                         (dict(seq_lens=["128", "-4"]), "--seq_lens"), (dict(seq_lens=["x"]), "--seq_lens"),
                         (dict(causal=["maybe"]), "--causal"), (dict(repeats=0), "--repeats"),
                         (dict(warmup=-1), "--warmup"),
                         (dict(pallas_block_sizes='[{"block_q": 32}]'), "multiple of 64"),
                         (dict(pallas_block_sizes='[{"bq": 64}]'), "unknown BlockSizes field"),
                         (dict(pallas_block_sizes="{"), "not JSON"),
                         (dict(pallas_block_sizes='[{}, {"stages": 2}]'), "listed twice"),
                         (dict(impls=["xla"], pallas_block_sizes="[{}]"), "needs 'pallas'")):
        with pytest.raises(app.UsageError, match=message):
            parse(**bad)


def test_time_rounds_rotates_the_order_and_drops_a_backend_that_raises():
    order, dropped = [], []

    def call(name, fail_on=None):
        def run():
            order.append(name)
            if len(order) == fail_on:
                raise RuntimeError("out of memory")
            return 0
        return run

    times = bench.time_rounds({"a": call("a"), "b": call("b"), "c": call("c")}, warmup=1, repeats=3,
                              on_error=lambda n, e: dropped.append((n, str(e))))
    assert order == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warmup, then 3 rounds
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3} and not dropped
    order.clear()
    times = bench.time_rounds({"a": call("a"), "b": call("b", fail_on=5)}, warmup=1, repeats=3,
                              on_error=lambda n, e: dropped.append((n, str(e))))
    assert list(times) == ["a"] and len(times["a"]) == 3 and dropped == [("b", "out of memory")]
