import dataclasses
import io
import json

import jax
import numpy as np
import pytest
from absl import app, flags

from atoll.experiments.bench import grouped_matmul as bench
from atoll.kernels import grouped_matmul_reference

# The cpu preset: E, tokens, d_model, d_ff.
E, M, D, F = 4, 256, 64, 128
LEADING = ["impl", "E", "tokens", "groups", "pass", "tflops", "ratio_to_dense", "ratio_to_ragged_dot"]


def run(settings, backends=None):
    lines, log = [], io.StringIO()
    # Every object goes through JSON as on stdout (no NaN, no numpy scalars).
    rows, summary = bench.run(settings, lambda obj: lines.append(json.loads(json.dumps(obj, allow_nan=False))),
                              log=log, backends=backends)
    assert lines == [*rows, summary]
    return lines[:-1], lines[-1], log.getvalue()


@pytest.fixture(scope="module")
def output():
    return run(bench.parse_settings("cpu"))


def test_rows_schema_and_flops(output):
    rows, _, _ = output
    assert [(r["impl"], r["groups"], r["pass"]) for r in rows] == [
        (impl, g, p) for p in ("fwd", "fwd+bwd") for g in ("equal", "zipf") for impl in ("einsum", "xla", "pallas")]
    for r in rows:
        assert list(r)[:8] == LEADING
        assert (r["E"], r["tokens"], r["d_model"], r["d_ff"]) == (E, M, D, F)
        if r["impl"] == "pallas":
            continue
        flops = 2 * M * D * F * (3 if r["pass"] == "fwd+bwd" else 1)
        assert r["flops"] == flops and r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
        assert r["tflops"] == pytest.approx(flops / r["time_s"] / 1e12, rel=1e-12)
        # bf16 against the fp32 ragged_dot: rounding only, well inside the tolerance.
        assert 0 < r["max_rel_err"] < 0.01 and r["max_abs_err"] > 0


def test_ratios_follow_the_tflops(output):
    rows, _, _ = output
    by = {(r["impl"], r["groups"], r["pass"]): r for r in rows}
    for (impl, g, p), r in by.items():
        if impl == "pallas":
            continue
        dense, ragged = by["einsum", g, p]["tflops"], by["xla", g, p]["tflops"]
        assert r["ratio_to_dense"] == pytest.approx(r["tflops"] / dense, rel=1e-12)
        assert r["ratio_to_ragged_dot"] == pytest.approx(r["tflops"] / ragged, rel=1e-12)
    for p in ("fwd", "fwd+bwd"):
        assert by["einsum", "equal", p]["ratio_to_dense"] == by["xla", "equal", p]["ratio_to_ragged_dot"] == 1.0
        # The Zipf rows' dense baseline is the equal-group einsum: one measurement, reported twice.
        assert by["einsum", "zipf", p]["time_s"] == by["einsum", "equal", p]["time_s"]
        zipf, equal = by["xla", "zipf", p], by["xla", "equal", p]
        assert zipf["skew_time_per_flop"] == pytest.approx(zipf["time_s"] / equal["time_s"], rel=1e-12)
        assert "skew_time_per_flop" not in equal and "skew_time_per_flop" not in by["einsum", "zipf", p]


def test_pallas_is_skipped_with_a_reason_off_the_gpu(output):
    if jax.default_backend() == "gpu":
        pytest.skip("pallas runs on a GPU")
    rows, summary, log = output
    pallas = [r for r in rows if r["impl"] == "pallas"]
    assert len(pallas) == 4
    for r in pallas:
        assert r["tflops"] is None and r["ratio_to_dense"] is None and r["ratio_to_ragged_dot"] is None
        assert "IMPLEMENTATIONS" in r["skipped"] or "needs a GPU" in r["skipped"]
    assert summary["skipped"] == [f"skipped pallas: {pallas[0]['skipped']}"] and summary["skipped"][0] in log
    acc = summary["acceptance"]
    assert acc["impl"] == "pallas"
    assert acc["fwd_equal_ratio_to_dense"] == {"min": None, "at": None, "median": None, "configs": 0, "missing": 1,
                                               "target": 0.8, "met": None}
    assert acc["fwd_equal_ratio_to_ragged_dot"]["target"] == 3.0 and acc["fwd_equal_ratio_to_ragged_dot"]["met"] is None
    assert acc["skewed_vs_equal_time_per_flop"]["target"] == 1.5


def test_summary_and_table(output):
    rows, summary, log = output
    by = {(r["impl"], r["groups"], r["pass"]): r for r in rows}
    assert summary["summary"] == "grouped_matmul" and summary["preset"] == "cpu" and summary["rows"] == 12
    assert summary["device"] and summary["jax"] == jax.__version__ and summary["date"]
    assert summary["failed"] == []
    xla = summary["by_impl"]["xla"]
    assert xla["fwd_equal_ratio_to_dense"]["min"] == by["xla", "equal", "fwd"]["ratio_to_dense"]
    assert xla["fwd_equal_ratio_to_ragged_dot"]["min"] == 1.0
    skew = max(by["xla", "zipf", p]["skew_time_per_flop"] for p in ("fwd", "fwd+bwd"))
    assert xla["skewed_vs_equal_time_per_flop"]["max"] == skew
    sizes = summary["zipf_group_sizes"][f"E{E} T{M}"]
    assert sizes == bench.zipf_group_sizes(M, E, 1.0, 0).tolist() and sum(sizes) == M
    assert "| d_model×d_ff | E | tokens | groups | pass |" in log
    assert log.count(f"| {D}×{F} | {E} | {M} | ") == 4  # one table line per configuration


def test_zipf_group_sizes():
    for tokens, experts in ((256, 4), (16384, 8), (65536, 64)):
        sizes = bench.zipf_group_sizes(tokens, experts, 1.0, 0)
        assert sizes.dtype == np.int32 and sizes.shape == (experts,) and sizes.sum() == tokens
        assert sizes.max() > 1.5 * tokens / experts  # skewed
        assert np.array_equal(sizes, bench.zipf_group_sizes(tokens, experts, 1.0, 0))  # deterministic
    assert not np.array_equal(bench.zipf_group_sizes(16384, 8, 1.0, 0), bench.zipf_group_sizes(16384, 8, 1.0, 1))
    steep = bench.zipf_group_sizes(256, 64, 2.0, 0)
    assert steep.sum() == 256 and (steep == 0).any()  # empty groups happen
    flat, skewed = bench.zipf_group_sizes(65536, 8, 0.5, 0), bench.zipf_group_sizes(65536, 8, 1.5, 0)
    assert flat.max() < skewed.max()


def test_broken_and_wrong_backends_are_reported_not_timed():
    def broken(x, w, gs):
        raise NotImplementedError("no kernel for this shape")

    def wrong(x, w, gs):
        return (2 * grouped_matmul_reference(x, w, gs)).astype(x.dtype)

    # 250 tokens do not split into 4 groups: Zipf only, and no einsum baseline.
    settings = dataclasses.replace(bench.parse_settings("cpu", tokens=["250"], groups=["zipf"], passes=["fwd"],
                                                        repeats=1, warmup=0),
                                   impls=("einsum", "xla", "broken", "wrong"))
    rows, summary, log = run(settings, backends={"broken": broken, "wrong": wrong})
    by = {r["impl"]: r for r in rows}
    assert list(by) == ["einsum", "xla", "broken", "wrong"] and all(r["groups"] == "zipf" for r in rows)
    assert by["einsum"]["tflops"] is None and "does not split into E=4 equal groups" in by["einsum"]["skipped"]
    assert by["xla"]["tflops"] > 0 and by["xla"]["ratio_to_dense"] is None and by["xla"]["ratio_to_ragged_dot"] == 1.0
    assert by["broken"]["tflops"] is None and "does not compile: NotImplementedError" in by["broken"]["skipped"]
    assert by["wrong"]["tflops"] is None and "exceeds --tolerance=0.02" in by["wrong"]["failed"]
    assert by["wrong"]["max_rel_err"] == pytest.approx(1.0, rel=0.02)
    assert len(summary["failed"]) == 1 and summary["failed"][0] in log
    assert summary["by_impl"]["wrong"]["skewed_vs_equal_time_per_flop"]["missing"] == 1


def test_acceptance_from_rows():
    def row(impl, g, p, dense, ragged, skew=None, cfg=(8, 16384)):
        r = {"impl": impl, "E": cfg[0], "tokens": cfg[1], "d_model": 1024, "d_ff": 4096, "groups": g, "pass": p,
             "ratio_to_dense": dense, "ratio_to_ragged_dot": ragged}
        return {**r, "skew_time_per_flop": skew} if skew is not None else r

    rows = [row("pallas", "equal", "fwd", 0.9, 3.5), row("pallas", "equal", "fwd", 0.85, 4.0, cfg=(64, 16384)),
            row("pallas", "zipf", "fwd", 0.7, 3.0, skew=1.2), row("pallas", "zipf", "fwd+bwd", 0.7, 3.0, skew=1.4)]
    acc = bench.acceptance(rows)
    assert acc["fwd_equal_ratio_to_dense"]["min"] == 0.85
    assert acc["fwd_equal_ratio_to_dense"]["at"] == "E64 T16384 1024x4096"
    assert acc["fwd_equal_ratio_to_dense"]["met"] and acc["fwd_equal_ratio_to_ragged_dot"]["met"]
    assert acc["skewed_vs_equal_time_per_flop"]["max"] == 1.4 and acc["skewed_vs_equal_time_per_flop"]["met"]
    assert acc["skewed_vs_equal_time_per_flop"]["at"] == "E8 T16384 1024x4096 fwd+bwd"
    # One configuration without pallas, or one below target: not met.
    missing = bench.acceptance([*rows, row("pallas", "equal", "fwd", None, None)])
    assert missing["fwd_equal_ratio_to_dense"]["met"] is False and missing["fwd_equal_ratio_to_dense"]["missing"] == 1
    slow = bench.acceptance([*rows, row("pallas", "equal", "fwd", 0.5, 2.0)])
    assert slow["fwd_equal_ratio_to_ragged_dot"]["met"] is False and slow["fwd_equal_ratio_to_ragged_dot"]["min"] == 2.0


@pytest.mark.parametrize("given, message", [
    ({"tokens": ["250"]}, "--tokens=250 does not split into --experts=4 equal groups"),
    ({"impls": ["xla", "cublas"]}, "--impls: unknown or empty ['cublas']"),
    ({"impls": []}, "--impls: unknown or empty"),
    ({"experts": ["0"]}, "--experts: 0 must be positive"),
    ({"tokens": ["16k"]}, "--tokens: '16k' is not an integer"),
    ({"shapes": ["64by128"]}, "--shapes: '64by128' is not d_model x d_ff"),
    ({"shapes": ["0x128"]}, "--shapes: '0x128' needs positive"),
    ({"groups": ["skewed"]}, "--groups: unknown or empty ['skewed']"),
    ({"passes": ["bwd"]}, "--passes: unknown or empty ['bwd']"),
    ({"zipf_a": 0.0}, "--zipf_a=0.0: must be a positive number"),
    ({"repeats": 0}, "--repeats=0: must be at least 1"),
    ({"warmup": -1}, "--warmup=-1: must be at least 0"),
    ({"tolerance": 0.0}, "--tolerance=0.0: must be positive"),
])
def test_flags_are_validated(given, message):
    with pytest.raises(app.UsageError) as e:
        bench.parse_settings("cpu", **given)
    assert message in str(e.value)


def test_presets_and_command_line():
    with pytest.raises(app.UsageError, match="--preset='tpu'"):
        bench.parse_settings("tpu")
    assert bench.parse_settings("cpu", tokens=["250"], groups=["zipf"]).tokens == (250,)
    h100 = bench.parse_settings()
    assert (h100.experts, h100.tokens, h100.shapes) == ((8, 64), (16384, 32768, 65536), ((1024, 4096), (2048, 2048)))
    assert (h100.groups, h100.passes, h100.impls, h100.dtype) == (
        ("equal", "zipf"), ("fwd", "fwd+bwd"), ("einsum", "xla", "pallas"), "bfloat16")
    fv = flags.FlagValues()
    bench.define_flags(fv)
    fv(["bench", "--preset=cpu", "--tokens=512,1024", "--passes=fwd"])
    s = bench.settings_from_flags(fv)
    assert (s.preset, s.experts, s.tokens, s.shapes, s.passes, s.repeats) == ("cpu", (4,), (512, 1024), ((64, 128),),
                                                                              ("fwd",), 3)
    fv.unparse_flags()
    fv(["bench"])
    assert bench.settings_from_flags(fv) == h100


def test_pallas_tile_variants_parse_and_bad_ones_are_named():
    s = bench.parse_settings("cpu", impls=["einsum", "xla", "pallas:128x64x64s4m"])
    assert s.impls == ("einsum", "xla", "pallas:128x64x64s4m")
    bs = bench.pallas_block_sizes("pallas:128x64x64s4m")
    assert (bs.block_m, bs.block_n, bs.block_k, bs.stages, bs.fastest) == (128, 64, 64, 4, "m")
    with pytest.raises(app.UsageError, match="not a pallas tile variant"):
        bench.parse_settings("cpu", impls=["pallas:128x64"])
    with pytest.raises(app.UsageError, match="pallas:100x64x64s2n.*multiple of 64"):
        bench.parse_settings("cpu", impls=["pallas:100x64x64s2n"])
