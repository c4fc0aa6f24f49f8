"""TFLOP/s of the grouped matmul (atoll.kernels.grouped_matmul) against a dense
batched einsum and against jax.lax.ragged_dot, in one run:

    python -m atoll.experiments.bench.grouped_matmul

(the defaults, --preset=h100, are the issue's sweep: E 8 and 64 experts,
16k/32k/64k tokens, d_model×d_ff 1024×4096 and 2048×2048, equal and Zipf group
sizes, fwd and fwd+bwd, bf16). A CPU smoke run of a few seconds:

    python -m atoll.experiments.bench.grouped_matmul --preset=cpu

Any flag given on the command line overrides the preset's value.

The backends (--impls), each jitted and compiled per configuration:

  einsum   the baseline: x [M, D] reshaped [E, M/E, D], einsum with w [E, D, F]
           (fp32 accumulation, output in --dtype). It computes E equal groups;
           for Zipf rows it is the same call (equal groups of the same shape:
           the same FLOPs), timed once and reported under both groupings.
  xla      grouped_matmul(..., implementation="xla"): jax.lax.ragged_dot
  pallas   grouped_matmul(..., implementation="pallas"): atoll's Mosaic GPU
           kernel, when the package has it. Off the GPU it would run in Pallas'
           interpreter (slow): skipped unless --pallas_interpret (then called
           eagerly, as the attention bench does).
  pallas:<block_m>x<block_n>x<block_k>s<stages><m|n>   the same kernel with
           other tiles (pallas:128x128x64s4n; the last letter is the tile index
           that varies fastest between programs): tuning runs. The acceptance
           figures are about "pallas", the defaults.
  auto     grouped_matmul(..., implementation=None): the backend the package
           picks here (what the MoE layer gets)
  any other name of atoll.kernels.grouped_matmul.IMPLEMENTATIONS ("dense" is
  the package's masked reference: E× the work)

Inputs: x [M, D] standard normal, w [E, D, F] normal with std 1/sqrt(D) (so y
is O(1)), a cotangent dy [M, F] standard normal, all in --dtype, fixed per
shape. Group sizes are data (one compile serves both groupings): "equal" is
M/E per expert; "zipf" samples M expert choices from p(rank r) ∝ r^-a
(--zipf_a), the ranks shuffled over the experts, with numpy's generator seeded
by --zipf_seed: deterministic, summing to M, rows sorted by expert, a group may
be empty (zipf_group_sizes). The passes:

  fwd      y = f(x, w, group_sizes)                   FLOPs 2·M·D·F
  fwd+bwd  jax.value_and_grad of sum(y·dy) in fp32     FLOPs 3 × 2·M·D·F
           with respect to x and w

TFLOP/s = FLOPs / median time / 1e12 for every backend alike (sum(group_sizes)
= M, so equal and Zipf do the same FLOPs). A configuration is (d_model, d_ff,
E, tokens, pass); all its calls (every backend × grouping) are compiled, then
called --warmup times untimed, then timed over --repeats rounds of one call
each, the order rotating every round, with block_until_ready; the time is the
median.

Correctness first: before timing, every call's result is compared with a
reference, ragged_dot (implementation="xla") run in float32 at "highest"
matmul precision on the same inputs upcast (if that reference cannot run, the
xla call's own result, at --dtype). max_abs_err is the largest |result − ref|
(of y; of dx and dw for fwd+bwd), max_rel_err the same over max |ref|, per
array, the largest. A call with max_rel_err above --tolerance (or non-finite)
is not timed: its row says "failed" and carries no TFLOP/s.

Every row is one JSON line on stdout, these keys first:

  {"impl", "E", "tokens", "groups", "pass", "tflops", "ratio_to_dense", "ratio_to_ragged_dot"}

ratio_to_dense = tflops / the einsum's tflops, ratio_to_ragged_dot = tflops /
the xla row's tflops, for the same configuration and grouping, measured in the
same run (null when that one did not run). Then d_model, d_ff, time_s (median),
time_min_s, time_max_s, flops, max_abs_err, max_rel_err, and on Zipf rows
skew_time_per_flop = this time / the same backend's equal-group time (same
FLOPs; > 1 = the skew costs). A backend that is absent here, fails to compile
or run, or is wrong gets rows with null figures and "skipped": reason or
"failed": reason, and a stderr line; the run goes on. After the rows: a
markdown table on stderr and a summary line on stdout,

  {"summary": "grouped_matmul", "device", "backend", "jax", "date", "dtype", ...,
   "by_impl": {impl: {"fwd_equal_ratio_to_dense_min", "fwd_equal_ratio_to_ragged_dot_min",
                      "skew_time_per_flop_max", ...}},
   "acceptance": {"impl": "pallas", "fwd_equal_ratio_to_dense": {"min", "at", "target": 0.8, "met"},
                  "fwd_equal_ratio_to_ragged_dot": {... "target": 3.0},
                  "skewed_vs_equal_time_per_flop": {"max", "at", "target": 1.5, "met"}},
   "zipf_group_sizes": {"E8 T16384": [...], ...}, "skipped": [...], "failed": [...]}

"met" is null where pallas never ran, false where it missed a configuration.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from atoll.experiments.bench.attention import _positive_ints as _ints
from atoll.experiments.bench.attention import time_rounds
from atoll.parallel import runtime

# The package module itself (atoll.kernels re-exports its function under the same name): its
# IMPLEMENTATIONS is read at run time, whatever backends it has by then.
gmm = importlib.import_module("atoll.kernels.grouped_matmul")

BASELINE = "einsum"  # the dense batched einsum: ratio_to_dense
RAGGED = "xla"  # jax.lax.ragged_dot: ratio_to_ragged_dot
SUBJECT = "pallas"  # the kernel the acceptance figures are about
AUTO = "auto"  # implementation=None: what the MoE layer gets
GROUPINGS = ("equal", "zipf")
PASSES = ("fwd", "fwd+bwd")
FWD_BWD_FACTOR = 3  # backward = two matmuls of the forward's size (dx and dw)
TARGETS = {"fwd_equal_ratio_to_dense": 0.8, "fwd_equal_ratio_to_ragged_dot": 3.0,
           "skewed_vs_equal_time_per_flop": 1.5}
LEADING = ("impl", "E", "tokens", "groups", "pass", "tflops", "ratio_to_dense", "ratio_to_ragged_dot")

PRESETS: dict[str, dict[str, Any]] = {
    "h100": {"impls": ["einsum", "xla", "pallas"], "experts": ["8", "64"], "tokens": ["16384", "32768", "65536"],
             "shapes": ["1024x4096", "2048x2048"], "groups": ["equal", "zipf"], "passes": ["fwd", "fwd+bwd"],
             "zipf_a": 1.0, "zipf_seed": 0, "dtype": "bfloat16", "warmup": 2, "repeats": 10, "tolerance": 0.02,
             "pallas_interpret": False},
}
PRESETS["cpu"] = {**PRESETS["h100"], "experts": ["4"], "tokens": ["256"], "shapes": ["64x128"], "warmup": 1,
                  "repeats": 3}
SETTINGS_FLAGS = tuple(PRESETS["h100"])


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line's flags, defined only when run as a program (importing the helpers, e.g.
    from a test, defines nothing). Their defaults are the h100 preset's; a flag given on the
    command line overrides --preset."""
    d, fv = PRESETS["h100"], {"flag_values": flag_values}
    flags.DEFINE_enum("preset", "h100", list(PRESETS), "Values for every flag not given: h100 (the issue's "
                      "sweep) or cpu (tiny sizes, seconds on a CPU).", **fv)
    flags.DEFINE_list("impls", d["impls"], "Backends: einsum (the dense baseline), auto (implementation=None) "
                      "and names of atoll.kernels.grouped_matmul.IMPLEMENTATIONS (xla = ragged_dot, pallas).", **fv)
    flags.DEFINE_list("experts", d["experts"], "E: numbers of experts (groups).", **fv)
    flags.DEFINE_list("tokens", d["tokens"], "M: rows of x (token-expert assignments).", **fv)
    flags.DEFINE_list("shapes", d["shapes"], "d_model x d_ff pairs: x [M, d_model] @ w [E, d_model, d_ff].", **fv)
    flags.DEFINE_list("groups", d["groups"], "Group sizes: equal, zipf or both.", **fv)
    flags.DEFINE_list("passes", d["passes"], "fwd, fwd+bwd or both.", **fv)
    flags.DEFINE_float("zipf_a", d["zipf_a"], "Zipf exponent a of the skewed group sizes, p(rank r) ∝ r^-a.", **fv)
    flags.DEFINE_integer("zipf_seed", d["zipf_seed"], "Seed of the Zipf group sizes.", **fv)
    flags.DEFINE_enum("dtype", d["dtype"], ["bfloat16", "float16", "float32"], "x, w and dy dtype.", **fv)
    flags.DEFINE_integer("warmup", d["warmup"], "Untimed calls of each backend after compilation.", **fv)
    flags.DEFINE_integer("repeats", d["repeats"], "Timed rounds (one call of each backend per round).", **fv)
    flags.DEFINE_float("tolerance", d["tolerance"], "Largest max_rel_err against the fp32 reference that "
                       "still counts as correct.", **fv)
    flags.DEFINE_bool("pallas_interpret", d["pallas_interpret"], "Off the GPU, run pallas in its interpreter "
                      "(slow) instead of skipping it.", **fv)
    flags.DEFINE_string("out", None, "Also write the JSON lines (rows and summary) to this .jsonl path.", **fv)


# ------------------------------------------------------------------ settings (pure)


@dataclasses.dataclass(frozen=True)
class Settings:
    preset: str
    impls: tuple[str, ...]
    experts: tuple[int, ...]
    tokens: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # (d_model, d_ff)
    groups: tuple[str, ...]
    passes: tuple[str, ...]
    zipf_a: float
    zipf_seed: int
    dtype: str
    warmup: int
    repeats: int
    tolerance: float
    pallas_interpret: bool


def known_impls() -> tuple[str, ...]:
    """einsum, auto, pallas (the subject: skipped, not refused, while the package lacks it) and
    whatever atoll.kernels.grouped_matmul.IMPLEMENTATIONS holds now."""
    return tuple(dict.fromkeys((BASELINE, *gmm.IMPLEMENTATIONS, SUBJECT, AUTO)))


def _choices(flag: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    values = [str(v).strip() for v in values]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise app.UsageError(f"--{flag}: unknown or empty {unknown or values}; choose from {list(allowed)}")
    return tuple(dict.fromkeys(values))


def _shapes(values: Sequence[str]) -> tuple[tuple[int, int], ...]:
    if not values:
        raise app.UsageError("--shapes is empty")
    out = []
    for v in values:
        parts = str(v).strip().lower().split("x")
        try:
            D, F = (int(p) for p in parts)
        except ValueError:
            raise app.UsageError(f"--shapes: {v!r} is not d_model x d_ff, like 1024x4096") from None
        if D < 1 or F < 1:
            raise app.UsageError(f"--shapes: {v!r} needs positive d_model and d_ff")
        out.append((D, F))
    return tuple(dict.fromkeys(out))


def parse_settings(preset: str = "h100", **given: Any) -> Settings:
    """The preset's values with the `given` ones (flag name -> flag value) over them, checked;
    app.UsageError naming the first bad flag."""
    if preset not in PRESETS:
        raise app.UsageError(f"--preset={preset!r}: choose from {list(PRESETS)}")
    unknown = sorted(set(given) - set(SETTINGS_FLAGS))
    if unknown:
        raise ValueError(f"parse_settings: unknown setting(s) {unknown}")
    v = {**PRESETS[preset], **given}
    variants = [str(i).strip() for i in v["impls"] if str(i).strip().startswith(SUBJECT + ":")]
    for name in variants:
        pallas_block_sizes(name)  # a clear error for a malformed tile name
    impls = _choices("impls", v["impls"], (*known_impls(), *variants))
    experts, tokens = _ints("experts", v["experts"]), _ints("tokens", v["tokens"])
    groups = _choices("groups", v["groups"], GROUPINGS)
    passes = _choices("passes", v["passes"], PASSES)
    if "equal" in groups:
        bad = [(E, M) for E in experts for M in tokens if M % E]
        if bad:
            E, M = bad[0]
            raise app.UsageError(f"--tokens={M} does not split into --experts={E} equal groups "
                                 f"(needed by --groups=equal); use multiples of every E, or --groups=zipf")
    if not (isinstance(v["zipf_a"], (int, float)) and math.isfinite(v["zipf_a"]) and v["zipf_a"] > 0):
        raise app.UsageError(f"--zipf_a={v['zipf_a']}: must be a positive number (larger = more skewed)")
    if v["repeats"] < 1:
        raise app.UsageError(f"--repeats={v['repeats']}: must be at least 1")
    if v["warmup"] < 0:
        raise app.UsageError(f"--warmup={v['warmup']}: must be at least 0")
    if not v["tolerance"] > 0:
        raise app.UsageError(f"--tolerance={v['tolerance']}: must be positive")
    if v["dtype"] not in ("bfloat16", "float16", "float32"):
        raise app.UsageError(f"--dtype={v['dtype']!r}: choose from bfloat16, float16, float32")
    return Settings(preset=preset, impls=impls, experts=experts, tokens=tokens, shapes=_shapes(v["shapes"]),
                    groups=groups, passes=passes, zipf_a=float(v["zipf_a"]), zipf_seed=int(v["zipf_seed"]),
                    dtype=v["dtype"], warmup=int(v["warmup"]), repeats=int(v["repeats"]),
                    tolerance=float(v["tolerance"]), pallas_interpret=bool(v["pallas_interpret"]))


def settings_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Settings:
    """--preset, overridden by the flags given on the command line."""
    given = {name: flag_values[name].value for name in SETTINGS_FLAGS if flag_values[name].present}
    return parse_settings(flag_values["preset"].value, **given)


# ------------------------------------------------------------------ group sizes, FLOPs, rows (pure)


def equal_group_sizes(tokens: int, E: int) -> np.ndarray:
    return np.full(E, tokens // E, np.int32)


def zipf_group_sizes(tokens: int, E: int, a: float, seed: int) -> np.ndarray:
    """`tokens` expert choices drawn from p(rank r) ∝ r^-a, ranks shuffled over the experts;
    deterministic in seed, summing to tokens; a group may be empty."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1, dtype=np.float64) ** a
    counts = rng.multinomial(tokens, p / p.sum())
    return counts[rng.permutation(E)].astype(np.int32)


def matmul_flops(tokens: int, D: int, F: int, pass_: str) -> float:
    """2·M·D·F for the forward; × 3 for fwd+bwd (dx and dw are each a forward's work)."""
    fwd = 2.0 * tokens * D * F
    return fwd * FWD_BWD_FACTOR if pass_ == "fwd+bwd" else fwd


def tflops(flops: float, time_s: float) -> float:
    return flops / time_s / 1e12


def call_grouping(impl: str, groups: str) -> str:
    """The grouping a row's timed call ran: the einsum always runs equal groups."""
    return "equal" if impl == BASELINE else groups


def config_rows(E: int, tokens: int, D: int, F: int, pass_: str, impls: Sequence[str], groups: Sequence[str],
                times: Mapping[tuple[str, str], Sequence[float]], errors: Mapping[tuple[str, str], tuple],
                problems: Mapping[tuple[str, str], tuple[str, str]]) -> list[dict]:
    """The rows of one configuration, one per (impl, grouping), from the timed calls' round times
    (keyed (impl, grouping it ran)), their (max_abs_err, max_rel_err) and, for calls that did not
    run, ("skipped" | "failed", reason)."""
    flops = matmul_flops(tokens, D, F, pass_)
    tf = {key: tflops(flops, statistics.median(ts)) for key, ts in times.items()}
    rows = []
    for g in groups:
        dense, ragged = tf.get((BASELINE, "equal")), tf.get((RAGGED, g))
        for impl in impls:
            key = (impl, call_grouping(impl, g))
            row: dict[str, Any] = {"impl": impl, "E": E, "tokens": tokens, "groups": g, "pass": pass_,
                                   "tflops": None, "ratio_to_dense": None, "ratio_to_ragged_dot": None,
                                   "d_model": D, "d_ff": F}
            if key in tf:
                ts = times[key]
                row.update(tflops=tf[key], ratio_to_dense=tf[key] / dense if dense else None,
                           ratio_to_ragged_dot=tf[key] / ragged if ragged else None,
                           time_s=statistics.median(ts), time_min_s=min(ts), time_max_s=max(ts), flops=flops)
                abs_err, rel_err = errors.get(key, (None, None))
                row.update(max_abs_err=abs_err, max_rel_err=rel_err)
                if g == "zipf" and impl != BASELINE and (impl, "equal") in times:
                    row["skew_time_per_flop"] = statistics.median(ts) / statistics.median(times[impl, "equal"])
            else:
                kind, reason = problems.get(key, ("skipped", "not run"))
                if kind == "failed":
                    abs_err, rel_err = errors.get(key, (None, None))
                    row.update(max_abs_err=abs_err, max_rel_err=rel_err)
                row[kind] = reason
            rows.append(row)
    return rows


def _config_name(r: Mapping) -> str:
    return f"E{r['E']} T{r['tokens']} {r['d_model']}x{r['d_ff']}"


def impl_summary(rows: Sequence[dict], impl: str) -> dict[str, Any]:
    """One backend's figures over the run: its worst fwd equal-group ratios to the einsum and to
    ragged_dot, its worst skew cost, where each was, and how many configurations lack it."""
    mine = [r for r in rows if r["impl"] == impl]
    fwd_equal = [r for r in mine if r["pass"] == "fwd" and r["groups"] == "equal"]
    out: dict[str, Any] = {}
    for key, field in (("fwd_equal_ratio_to_dense", "ratio_to_dense"),
                       ("fwd_equal_ratio_to_ragged_dot", "ratio_to_ragged_dot")):
        rated = [r for r in fwd_equal if r[field] is not None]
        worst = min(rated, key=lambda r: r[field], default=None)
        out[key] = {"min": worst[field] if worst else None, "at": _config_name(worst) if worst else None,
                    "median": statistics.median(r[field] for r in rated) if rated else None,
                    "configs": len(rated), "missing": len(fwd_equal) - len(rated)}
    zipf = [r for r in mine if r["groups"] == "zipf"]
    skewed = [r for r in zipf if r.get("skew_time_per_flop") is not None]
    worst = max(skewed, key=lambda r: r["skew_time_per_flop"], default=None)
    out["skewed_vs_equal_time_per_flop"] = {
        "max": worst["skew_time_per_flop"] if worst else None,
        "at": f"{_config_name(worst)} {worst['pass']}" if worst else None,
        "configs": len(skewed), "missing": len(zipf) - len(skewed)}
    return out


def acceptance(rows: Sequence[dict], impl: str = SUBJECT) -> dict[str, Any]:
    """The issue's acceptance figures for `impl` with their targets; met is None where it never
    ran, False where a configuration lacks it or the worst one misses the target."""
    figures = impl_summary(rows, impl)
    out: dict[str, Any] = {"impl": impl}
    for key, target in TARGETS.items():
        fig = dict(figures[key])
        value = fig["max"] if "max" in fig else fig["min"]
        fig["target"] = target
        if value is None:
            fig["met"] = None
        elif key == "skewed_vs_equal_time_per_flop":
            fig["met"] = value <= target and fig["missing"] == 0
        else:
            fig["met"] = value >= target and fig["missing"] == 0
        out[key] = fig
    return out


def table(rows: Sequence[dict], impls: Sequence[str]) -> str:
    """Markdown: one line per (shape, E, tokens, groups, pass); per backend
    "TFLOP/s (× dense, × ragged_dot)", or why it did not run."""
    configs = list(dict.fromkeys((r["d_model"], r["d_ff"], r["E"], r["tokens"], r["groups"], r["pass"])
                                 for r in rows))
    by = {(r["d_model"], r["d_ff"], r["E"], r["tokens"], r["groups"], r["pass"], r["impl"]): r for r in rows}
    lines = ["| d_model×d_ff | E | tokens | groups | pass | "
             + " | ".join(f"{i} TFLOP/s (×dense, ×ragged_dot)" for i in impls) + " |",
             "|---|---|---|---|---|" + "---|" * len(impls)]
    for cfg in configs:
        cells = []
        for impl in impls:
            r = by.get((*cfg, impl))
            if r is None:
                cells.append("–")
            elif r["tflops"] is None:
                cells.append("failed" if "failed" in r else "skipped")
            else:
                def ratio(x):
                    return "–" if x is None else f"{x:.2f}"
                cells.append(f"{r['tflops']:.3g} ({ratio(r['ratio_to_dense'])}, {ratio(r['ratio_to_ragged_dot'])})")
        D, F, E, M, g, p = cfg
        lines.append(f"| {D}×{F} | {E} | {M} | {g} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the timed functions


def dense_einsum(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """The grouped matmul's work as E equal groups: a dense batched einsum over experts."""
    del group_sizes_E  # equal by construction
    E, D = w_EDF.shape[:2]
    y_EMF = jnp.einsum("emd,edf->emf", x_MD.reshape(E, -1, D), w_EDF, preferred_element_type=jnp.float32)
    return y_EMF.reshape(x_MD.shape[0], -1).astype(x_MD.dtype)


_TILE_NAME = re.compile(r"^(\d+)x(\d+)x(\d+)s(\d+)([mn])$")


def pallas_block_sizes(impl: str):
    """The BlockSizes of a tuning variant "pallas:<block_m>x<block_n>x<block_k>s<stages><m|n>"
    (the last letter: the tile index that varies fastest), e.g. pallas:128x128x64s4n; the
    kernel's own checks (multiples of 64, register budget) apply."""
    m = _TILE_NAME.match(impl.partition(":")[2])
    if not impl.startswith(SUBJECT + ":") or m is None:
        raise app.UsageError(f"--impls: {impl!r} is not a pallas tile variant like pallas:128x128x64s4n "
                             "(block_m x block_n x block_k, s stages, fastest index m or n)")
    bm, bn, bk, stages = (int(g) for g in m.groups()[:4])
    try:
        return gmm.BlockSizes(block_m=bm, block_n=bn, block_k=bk, stages=stages, fastest=m.group(5))
    except ValueError as e:
        raise app.UsageError(f"--impls: {impl}: {e}") from None


def backend_fn(impl: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    if impl == BASELINE:
        return dense_einsum
    if impl.startswith(SUBJECT + ":"):
        return functools.partial(gmm.grouped_matmul_pallas, block_sizes=pallas_block_sizes(impl))
    return functools.partial(gmm.grouped_matmul, implementation=None if impl == AUTO else impl)


def pass_fn(fn: Callable, pass_: str) -> Callable:
    """(x, w, group_sizes, dy) -> y (fwd) or (loss, (dx, dw)) of loss = sum(y·dy) in fp32 (fwd+bwd)."""
    if pass_ == "fwd":
        return lambda x_MD, w_EDF, gs_E, dy_MF: fn(x_MD, w_EDF, gs_E)

    def loss(x_MD, w_EDF, gs_E, dy_MF):
        return jnp.sum(fn(x_MD, w_EDF, gs_E).astype(jnp.float32) * dy_MF.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def make_inputs(tokens: int, E: int, D: int, F: int, dtype: str):
    """x [M, D] ~ N(0, 1), w [E, D, F] ~ N(0, 1/D), dy [M, F] ~ N(0, 1), in `dtype`."""
    kx, kw, kdy = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (tokens, D), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (E, D, F), jnp.float32) / math.sqrt(D)).astype(dtype)
    dy = jax.random.normal(kdy, (tokens, F), jnp.float32).astype(dtype)
    return x, w, dy


@functools.partial(jax.jit, static_argnums=(4,))
def _reference(x, w, gs, dy, pass_: str):
    f32 = jnp.float32
    return pass_fn(backend_fn(RAGGED), pass_)(x.astype(f32), w.astype(f32), gs, dy.astype(f32))


def reference(x, w, gs, dy, pass_: str):
    """ragged_dot in float32 at "highest" matmul precision, from the inputs upcast."""
    with jax.default_matmul_precision("highest"):
        return jax.block_until_ready(_reference(x, w, gs, dy, pass_))


def compared(result, ref, pass_: str) -> list[tuple[jax.Array, jax.Array]]:
    return [(result, ref)] if pass_ == "fwd" else list(zip(result[1], ref[1]))


@jax.jit
def _diffs_and_scales(pairs):
    f32 = jnp.float32
    return [(jnp.max(jnp.abs(a.astype(f32) - b.astype(f32))), jnp.max(jnp.abs(b.astype(f32)))) for a, b in pairs]


def errors_of(result, ref, pass_: str) -> tuple[float, float]:
    """(max |result − ref|, max over arrays of max |result − ref| / max |ref|); NaN if non-finite."""
    pairs = compared(result, ref, pass_)
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"result shape {a.shape}, expected {b.shape}")
    stats = jax.device_get(_diffs_and_scales(pairs))  # one compiled reduction on the device per pass
    abs_err, rel_err = 0.0, 0.0
    for diff, scale in stats:
        diff, scale = float(diff), float(scale)
        if not math.isfinite(diff):
            return math.nan, math.nan
        abs_err, rel_err = max(abs_err, diff), max(rel_err, diff / max(scale, 1e-30))
    return abs_err, rel_err


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------ the run


class Bench:
    """Runs the configurations; collects the skip and failure lines."""

    def __init__(self, settings: Settings, backends: Mapping[str, Callable] | None = None,
                 log: TextIO | None = None):
        self.s = settings
        self.extra = dict(backends or {})  # name -> fn(x, w, group_sizes): taken as available (tests)
        self.log = log or sys.stderr
        self.platform = jax.default_backend()
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.fns: dict[tuple[str, str], Callable] = {}

    def say(self, line: str) -> None:
        print(line, file=self.log, flush=True)

    def unavailable(self, impl: str) -> str | None:
        """Why `impl` cannot run on this platform at all, or None."""
        if impl in self.extra or impl in (BASELINE, AUTO):
            return None
        variant = impl.startswith(SUBJECT + ":")
        if not variant and impl not in gmm.IMPLEMENTATIONS:
            return (f"{impl!r} is not in atoll.kernels.grouped_matmul.IMPLEMENTATIONS "
                    f"{list(gmm.IMPLEMENTATIONS)}")
        if (impl == SUBJECT or variant) and self.platform != "gpu" and not self.s.pallas_interpret:
            return (f"the Mosaic GPU kernel needs a GPU; on {self.platform} it would run in Pallas' "
                    f"interpreter (slow): pass --pallas_interpret to time it anyway")
        return None

    def eager(self, impl: str) -> bool:
        return impl.partition(":")[0] == SUBJECT and self.platform != "gpu"  # the interpreter, outside jit (as the attention bench)

    def fn(self, impl: str, pass_: str) -> Callable:
        key = (impl, pass_)
        if key not in self.fns:
            f = pass_fn(self.extra.get(impl) or backend_fn(impl), pass_)
            self.fns[key] = f if self.eager(impl) else jax.jit(f)
        return self.fns[key]

    def prepare(self, impl: str, pass_: str, x, w, gs, dy) -> Callable:
        """fn(group_sizes) -> result, compiled ahead of time (group sizes are data: one
        compile serves every grouping)."""
        fn = self.fn(impl, pass_)
        if self.eager(impl):
            return lambda g: fn(x, w, g, dy)
        compiled = fn.lower(x, w, gs, dy).compile()
        return lambda g: compiled(x, w, g, dy)

    def run_config(self, E: int, M: int, D: int, F: int, pass_: str, inputs, sizes: Mapping[str, np.ndarray],
                   unavailable: Mapping[str, str]) -> list[dict]:
        """The rows of one configuration; `unavailable` maps the backends that cannot run here to why."""
        s = self.s
        x, w, dy = inputs
        where = f"(E={E}, tokens={M}, {D}x{F}, {pass_})"
        problems: dict[tuple[str, str], tuple[str, str]] = {
            (impl, call_grouping(impl, g)): ("skipped", why) for impl, why in unavailable.items() for g in s.groups}

        def problem(kind: str, key: tuple[str, str], reason: str) -> None:
            problems[key] = (kind, reason)
            line = f"{kind} {key[0]} {where} {key[1]} groups: {reason}"
            (self.failed if kind == "failed" else self.skipped).append(line)
            self.say(line)

        gs_dev = {g: jnp.asarray(v) for g, v in sizes.items()}
        keys = list(dict.fromkeys((impl, call_grouping(impl, g)) for impl in s.impls for g in s.groups
                                  if impl not in unavailable))
        if (BASELINE, "equal") in keys and "equal" not in gs_dev:
            keys.remove((BASELINE, "equal"))
            problem("skipped", (BASELINE, "equal"), f"tokens={M} does not split into E={E} equal groups")
        prepared: dict[str, Callable] = {}
        any_gs = next(iter(gs_dev.values()))  # the shape is all a compile sees
        for impl in dict.fromkeys(k[0] for k in keys):
            try:
                prepared[impl] = self.prepare(impl, pass_, x, w, any_gs, dy)
            except Exception as e:  # noqa: BLE001 - a backend failing is a result, not a crash
                for k in keys:
                    if k[0] == impl:
                        problem("skipped", k, f"does not compile: {_reason(e)}")
        # Correctness, one grouping (one reference) at a time, before any timing.
        errors: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        calls: dict[tuple[str, str], Callable[[], Any]] = {}
        for g in dict.fromkeys(k[1] for k in keys):
            mine = [k for k in keys if k[1] == g and k[0] in prepared]
            results = {}
            for key in mine:
                try:
                    results[key] = jax.block_until_ready(prepared[key[0]](gs_dev[g]))
                except Exception as e:  # noqa: BLE001
                    problem("skipped", key, f"does not run: {_reason(e)}")
            try:
                ref, ref_name = reference(x, w, gs_dev[g], dy, pass_), "fp32 ragged_dot"
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: fall back to the bf16 ragged_dot
                ref, ref_name = results.get((RAGGED, g)), f"{RAGGED} at {s.dtype}"
                self.say(f"the fp32 reference {where} {g} groups did not run ({_reason(e)}); "
                         f"checking against {ref_name if ref is not None else 'nothing'}")
            for key, result in results.items():
                if ref is None:
                    errors[key] = (None, None)
                else:
                    try:
                        abs_err, rel_err = errors_of(result, ref, pass_)
                    except Exception as e:  # noqa: BLE001 - a wrong shape, say
                        problem("failed", key, f"result not comparable with {ref_name}: {_reason(e)}")
                        continue
                    errors[key] = (_finite(abs_err), _finite(rel_err))
                    if not rel_err <= s.tolerance:  # NaN fails too
                        problem("failed", key, f"max_rel_err {rel_err:.3g} (max_abs_err {abs_err:.3g}) against "
                                               f"{ref_name} exceeds --tolerance={s.tolerance}")
                        continue
                calls[key] = functools.partial(prepared[key[0]], gs_dev[g])
            del results, ref
        names = {f"{impl}/{g}": (impl, g) for impl, g in calls}
        times = time_rounds({n: calls[names[n]] for n in names}, s.warmup, s.repeats,
                            lambda n, e: problem("skipped", names[n], f"raised while timed: {_reason(e)}"))
        times = {names[n]: ts for n, ts in times.items()}
        return config_rows(E, M, D, F, pass_, s.impls, s.groups, times, errors, problems)


def environment(dtype: str) -> dict:
    return {"dtype": dtype, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__}


def run(settings: Settings, emit: Callable[[dict], None], log: TextIO | None = None,
        backends: Mapping[str, Callable] | None = None) -> tuple[list[dict], dict]:
    """Every configuration: rows to `emit` as they are measured, then the table to `log` and the
    summary to `emit`. `backends` adds named fn(x, w, group_sizes) backends (tests)."""
    bench = Bench(settings, backends, log)
    s = settings
    unavailable = {impl: why for impl in s.impls if (why := bench.unavailable(impl)) is not None}
    for impl, why in unavailable.items():
        bench.skipped.append(f"skipped {impl}: {why}")
        bench.say(f"skipped {impl}: {why}")
    env = environment(s.dtype)
    rows: list[dict] = []
    zipf_sizes: dict[str, list[int]] = {}
    total = len(s.shapes) * len(s.experts) * len(s.tokens) * len(s.passes)
    done = 0
    for D, F in s.shapes:
        for E in s.experts:
            for M in s.tokens:
                sizes = {}
                if M % E == 0:
                    sizes["equal"] = equal_group_sizes(M, E)
                if "zipf" in s.groups:
                    sizes["zipf"] = zipf_group_sizes(M, E, s.zipf_a, s.zipf_seed)
                    zipf_sizes[f"E{E} T{M}"] = sizes["zipf"].tolist()
                inputs = make_inputs(M, E, D, F, s.dtype)
                for pass_ in s.passes:
                    done += 1
                    bench.say(f"[{done}/{total}] E={E} tokens={M} {D}x{F} {pass_}")
                    for row in bench.run_config(E, M, D, F, pass_, inputs, sizes, unavailable):
                        rows.append(row)
                        emit(row)
                del inputs
    print(table(rows, s.impls), file=bench.log, flush=True)
    summary = {"summary": "grouped_matmul", **env,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "preset": s.preset, "repeats": s.repeats, "warmup": s.warmup, "tolerance": s.tolerance,
               "zipf_a": s.zipf_a, "zipf_seed": s.zipf_seed,
               "acceptance": acceptance(rows),
               "by_impl": {impl: impl_summary(rows, impl) for impl in s.impls if impl != BASELINE},
               "zipf_group_sizes": zipf_sizes, "skipped": bench.skipped, "failed": bench.failed, "rows": len(rows)}
    emit(summary)
    return rows, summary


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    runtime.apply_xla_defaults()
    settings = settings_from_flags(flags.FLAGS)
    out = open(flags.FLAGS.out, "w") if flags.FLAGS.out else None

    def emit(obj: dict) -> None:
        line = json.dumps(obj, allow_nan=False)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    try:
        run(settings, emit)
    finally:
        if out:
            out.close()


if __name__ == "__main__":
    define_flags()
    app.run(main)
