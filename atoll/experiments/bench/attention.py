"""TFLOP/s of the attention backends (atoll.kernels.attention) against cuDNN,
forward and forward+backward, with each one's error against an fp32 reference:

    python -m atoll.experiments.bench.attention

(the defaults are the H100/H200 shape of shared/research/h100_baseline.md:
batch 4, 16 heads, head dims 128 and 64, S 2048..16384, causal and not, bf16).
A CPU smoke run (cuDNN is skipped there, Pallas would run in its slow
interpreter):

    python -m atoll.experiments.bench.attention --impls=xla --batch=1 --heads=2 \\
        --head_dims=64 --seq_lens=128,256

One GPU run can tune the Pallas kernels: every entry of --pallas_block_sizes
(a JSON list of BlockSizes fields) becomes its own implementation, named like
"pallas[bq64,bkv128,st2]" (bq/bkv/st always; bqb, bkvb, stb, wg, sb for
block_q_bwd, block_kv_bwd, stages_bwd, compute_wgs, schedule_barrier when not
the default):

    python -m atoll.experiments.bench.attention --impls=cudnn,pallas --seq_lens=8192 \\
        --pallas_block_sizes='[{"block_q":64,"block_kv":128},{"block_q":64,"block_kv":64,"stages":3}]'

FLOPs convention (as shared/research/h100_baseline.md): the forward counts
4·B·S²·H·D (two matmuls, 2 FLOPs per multiply-add), halved for causal; the
forward+backward counts 3.5 × the forward (the backward as 2.5 forwards).
TFLOP/s = FLOPs / median time / 1e12, for every backend alike, whatever work
it really executes.

Layout [B, S, H, D] for q, k, v (no grouped-query heads). Inputs are standard
normal in --dtype, the same for every backend. For every configuration
(S, D, causal, pass) each backend is jitted and compiled (Pallas on a non-GPU
platform runs eagerly instead: its interpreter can deadlock inside an outer
jit, and "compile" is then its first call), called --warmup times untimed, then
--repeats rounds run every backend of the configuration once per round, the
order rotating each round, timed with block_until_ready; the time is the
median. The passes:

  fwd      attention(q, k, v, causal=..., implementation=...)
  fwd+bwd  jax.value_and_grad of sum(out.astype(float32) · dout) with respect to
           q, k and v, dout a fixed random array

max_err is the largest absolute difference from the XLA reference
(implementation="xla" run in float32, matmuls at "highest" precision, from the
same inputs upcast): of the output for fwd, of dq, dk and dv for fwd+bwd. The
reference of a long sequence may not fit: above --max_err_seq_cap the error is
measured at S = cap with the other dimensions the same (max_err_S says where).

Every result is one JSON line on stdout, these keys first:

  {"impl", "S", "D", "causal", "pass", "tflops", "ratio_to_cudnn", "max_err"}

ratio_to_cudnn = tflops / cuDNN's tflops for the same configuration in the same
run; null (as max_err) where it could not be measured. Then time_s (median),
time_min_s, time_max_s, flops, max_err_S, compile_s, B, H, block_sizes (Pallas),
dtype, device, backend, jax. A backend unavailable here (cuDNN off the GPU), or
one that raises (unsupported shape, out of memory), is skipped with one stderr
line. After the rows: a table on stderr and a summary line on stdout,

  {"summary": "attention", "<impl>_vs_cudnn_<pass>_D<D>_<causal|noncausal>_S<S>": ratio, ...,
   "skipped": [...], "device", "backend", "jax", "date", ...}

with, for every backend but cuDNN and every (D, causal, pass), its ratio to
cuDNN at the largest S where both ran (else at the largest S it ran, null; no
_S suffix and null when it never ran).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from atoll.kernels.attention import IMPLEMENTATIONS, BlockSizes, attention, attention_pallas
from atoll.parallel import runtime

def define_flags() -> dict[str, flags.FlagHolder]:
    """The command line's flags, defined only when run as a program (so importing the
    helpers, e.g. from a test, defines no --batch or --out beside other modules' flags)."""
    return {
        "impls": flags.DEFINE_list("impls", ["xla", "cudnn", "pallas"],
                                   f"Backends to time, of {list(IMPLEMENTATIONS)}."),
        "batch": flags.DEFINE_integer("batch", 4, "B: batch size."),
        "heads": flags.DEFINE_integer("heads", 16, "H: attention heads (q, k and v alike)."),
        "head_dims": flags.DEFINE_list("head_dims", ["128", "64"], "D: head dims to time."),
        "seq_lens": flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384"], "S: sequence lengths to time."),
        "causal": flags.DEFINE_list("causal", ["false", "true"], "Masks to time: false, true or both."),
        "dtype": flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype."),
        "repeats": flags.DEFINE_integer("repeats", 10, "Timed rounds (one call of each backend per round)."),
        "warmup": flags.DEFINE_integer("warmup", 2, "Untimed calls of each backend after compilation."),
        "max_err_seq_cap": flags.DEFINE_integer(
            "max_err_seq_cap", 4096, "Above this S, max_err is measured at S = cap (the fp32 reference is S² memory)."),
        "pallas_block_sizes": flags.DEFINE_string(
            "pallas_block_sizes", None, "JSON list of dicts of BlockSizes fields; each is timed as its own "
            "'pallas[...]' backend in place of 'pallas'."),
        "out": flags.DEFINE_string("out", None, "Also write the JSON lines (rows and summary) to this .jsonl path."),
    }


PASSES = ("fwd", "fwd+bwd")
FWD_BWD_FACTOR = 3.5  # backward = 2.5 forwards (shared/research/h100_baseline.md)
_BS_ABBREV = {"block_q": "bq", "block_kv": "bkv", "stages": "st", "block_q_bwd": "bqb", "block_kv_bwd": "bkvb",
              "stages_bwd": "stb", "compute_wgs": "wg", "schedule_barrier": "sb"}
_BS_ALWAYS = ("block_q", "block_kv", "stages")


# ------------------------------------------------------------------ FLOPs and rows (pure)


def attention_flops(B: int, S: int, H: int, D: int, causal: bool, pass_: str) -> float:
    """4·B·S²·H·D for the forward, halved for causal; × 3.5 for fwd+bwd."""
    fwd = 4.0 * B * S * S * H * D / (2 if causal else 1)
    return fwd * FWD_BWD_FACTOR if pass_ == "fwd+bwd" else fwd


def tflops(flops: float, time_s: float) -> float:
    return flops / time_s / 1e12


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def config_rows(S: int, D: int, causal: bool, pass_: str, B: int, H: int, times: dict[str, list[float]],
                errors: dict[str, tuple[float | None, int | None]],
                extras: dict[str, dict] | None = None) -> list[dict]:
    """The rows of one configuration from each backend's round times and (max_err, max_err_S);
    ratio_to_cudnn against the "cudnn" entry of `times` (None without one)."""
    extras = extras or {}
    flops = attention_flops(B, S, H, D, causal, pass_)
    tf = {name: tflops(flops, statistics.median(ts)) for name, ts in times.items()}
    cudnn = tf.get("cudnn")
    rows = []
    for name, ts in times.items():
        err, err_S = errors.get(name, (None, None))
        row = {"impl": name, "S": S, "D": D, "causal": causal, "pass": pass_, "tflops": tf[name],
               "ratio_to_cudnn": tf[name] / cudnn if cudnn else None, "max_err": finite_or_none(err),
               "time_s": statistics.median(ts), "time_min_s": min(ts), "time_max_s": max(ts), "flops": flops,
               "max_err_S": err_S, "B": B, "H": H, **extras.get(name, {})}
        if err is not None and not math.isfinite(err):
            row["max_err_nonfinite"] = True
        rows.append(row)
    return rows


def summary_key(impl: str, pass_: str, D: int, causal: bool, S: int | None) -> str:
    key = f"{impl}_vs_cudnn_{pass_}_D{D}_{'causal' if causal else 'noncausal'}"
    return key if S is None else f"{key}_S{S}"


def summary_ratios(rows: Sequence[dict], impls: Sequence[str], head_dims: Sequence[int],
                   causals: Sequence[bool]) -> dict[str, float | None]:
    """For every backend but cuDNN and every (D, causal, pass): its ratio to cuDNN at the
    largest S where both ran; else null at the largest S it ran; else null, no S."""
    out: dict[str, float | None] = {}
    for D in head_dims:
        for causal in causals:
            for pass_ in PASSES:
                for impl in impls:
                    if impl == "cudnn":
                        continue
                    mine = [r for r in rows if (r["impl"], r["D"], r["causal"], r["pass"]) == (impl, D, causal, pass_)]
                    rated = [r for r in mine if r["ratio_to_cudnn"] is not None]
                    best = max(rated or mine, key=lambda r: r["S"], default=None)
                    if best is None:
                        out[summary_key(impl, pass_, D, causal, None)] = None
                    else:
                        out[summary_key(impl, pass_, D, causal, best["S"])] = best["ratio_to_cudnn"]
    return out


def table(rows: Sequence[dict], impls: Sequence[str]) -> str:
    """One line per configuration, "TFLOP/s (ratio to cuDNN)" per backend; '-' where it did not run."""
    configs = list(dict.fromkeys((r["D"], r["causal"], r["S"], r["pass"]) for r in rows))
    by = {(r["D"], r["causal"], r["S"], r["pass"], r["impl"]): r for r in rows}
    width = max([18, *(len(i) for i in impls)])
    head = f"{'D':>4} {'causal':>6} {'S':>6} {'pass':>7} | " + " | ".join(f"{i:>{width}}" for i in impls)
    lines = ["TFLOP/s (x cuDNN) by backend", head, "-" * len(head)]
    for cfg in configs:
        cells = []
        for impl in impls:
            r = by.get((*cfg, impl))
            if r is None:
                cell = "-"
            else:
                ratio = "n/a" if r["ratio_to_cudnn"] is None else f"{r['ratio_to_cudnn']:.2f}x"
                cell = f"{r['tflops']:.3g} ({ratio})"
            cells.append(f"{cell:>{width}}")
        D, causal, S, pass_ = cfg
        lines.append(f"{D:>4} {str(causal):>6} {S:>6} {pass_:>7} | " + " | ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------ flags (pure)


@dataclasses.dataclass(frozen=True)
class Settings:
    impls: dict[str, tuple[str, BlockSizes | None]]  # name -> (backend, Pallas block sizes or None)
    batch: int
    heads: int
    head_dims: tuple[int, ...]
    seq_lens: tuple[int, ...]
    causals: tuple[bool, ...]
    repeats: int
    warmup: int
    max_err_seq_cap: int


def block_sizes_name(bs: BlockSizes) -> str:
    """"pallas[bq64,bkv128,st2]": bq, bkv, st always, the other fields when not the default."""
    default = BlockSizes()
    parts = []
    for field, abbrev in _BS_ABBREV.items():
        value = getattr(bs, field)
        if field in _BS_ALWAYS or value != getattr(default, field):
            parts.append(f"{abbrev}{int(value)}")
    return f"pallas[{','.join(parts)}]"


def parse_block_sizes(text: str) -> list[BlockSizes]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--pallas_block_sizes is not JSON ({e}): {text!r}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise app.UsageError(f"--pallas_block_sizes must be a non-empty JSON list of objects, got {text!r}")
    fields = {f.name for f in dataclasses.fields(BlockSizes)}
    out = []
    for entry in entries:
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise app.UsageError(f"--pallas_block_sizes: unknown BlockSizes field(s) {unknown}; "
                                 f"known: {sorted(fields)}")
        bad = {k: v for k, v in entry.items() if not isinstance(v, int)}
        if bad:
            raise app.UsageError(f"--pallas_block_sizes: BlockSizes fields take integers (or booleans), got {bad}")
        try:
            out.append(BlockSizes(**entry))
        except ValueError as e:
            raise app.UsageError(f"--pallas_block_sizes: {e}") from None
    return out


def _positive_ints(flag: str, values: Sequence[str]) -> tuple[int, ...]:
    if not values:
        raise app.UsageError(f"--{flag} is empty")
    out = []
    for v in values:
        try:
            n = int(v)
        except ValueError:
            raise app.UsageError(f"--{flag}: {v!r} is not an integer") from None
        if n < 1:
            raise app.UsageError(f"--{flag}: {n} must be positive")
        out.append(n)
    return tuple(dict.fromkeys(out))


def parse_settings(impls: Sequence[str], batch: int, heads: int, head_dims: Sequence[str], seq_lens: Sequence[str],
                   causal: Sequence[str], repeats: int, warmup: int, max_err_seq_cap: int,
                   pallas_block_sizes: str | None) -> Settings:
    """The flags, checked; app.UsageError naming the first bad one."""
    impls = [i.strip() for i in impls]
    unknown = [i for i in impls if i not in IMPLEMENTATIONS]
    if unknown or not impls:
        raise app.UsageError(f"--impls: unknown or empty {unknown or impls}; choose from {list(IMPLEMENTATIONS)}")
    for flag, value in (("batch", batch), ("heads", heads), ("repeats", repeats), ("max_err_seq_cap", max_err_seq_cap)):
        if value < 1:
            raise app.UsageError(f"--{flag}={value}: must be positive")
    if warmup < 0:
        raise app.UsageError(f"--warmup={warmup}: must be at least 0")
    causals = []
    for c in causal:
        if c.strip().lower() not in ("true", "false"):
            raise app.UsageError(f"--causal: {c!r} is neither true nor false")
        causals.append(c.strip().lower() == "true")
    if not causals:
        raise app.UsageError("--causal is empty")
    named: dict[str, tuple[str, BlockSizes | None]] = {}
    for impl in dict.fromkeys(impls):
        if impl == "pallas" and pallas_block_sizes:
            for bs in parse_block_sizes(pallas_block_sizes):
                name = block_sizes_name(bs)
                if name in named:
                    raise app.UsageError(f"--pallas_block_sizes: {name} is listed twice")
                named[name] = ("pallas", bs)
        else:
            named[impl] = (impl, None)
    if pallas_block_sizes and "pallas" not in impls:
        raise app.UsageError("--pallas_block_sizes needs 'pallas' in --impls")
    return Settings(impls=named, batch=batch, heads=heads, head_dims=_positive_ints("head_dims", head_dims),
                    seq_lens=_positive_ints("seq_lens", seq_lens), causals=tuple(dict.fromkeys(causals)),
                    repeats=repeats, warmup=warmup, max_err_seq_cap=max_err_seq_cap)


# ------------------------------------------------------------------ the timed functions


def impl_attention(backend: str, causal: bool, block_sizes: BlockSizes | None) -> Callable:
    """(q_BSHD, k_BSHD, v_BSHD) -> out_BSHD for one backend."""
    if block_sizes is not None:
        return lambda q, k, v: attention_pallas(q, k, v, causal=causal, block_sizes=block_sizes, interpret=None)
    return lambda q, k, v: attention(q, k, v, causal=causal, implementation=backend)


def pass_fn(attn: Callable, pass_: str) -> Callable:
    """(q, k, v, dout) -> out (fwd) or (loss, (dq, dk, dv)) of loss = sum(out·dout) in fp32 (fwd+bwd)."""
    if pass_ == "fwd":
        return lambda q_BSHD, k_BSHD, v_BSHD, dout_BSHD: attn(q_BSHD, k_BSHD, v_BSHD)

    def loss(q_BSHD, k_BSHD, v_BSHD, dout_BSHD):
        return jnp.sum(attn(q_BSHD, k_BSHD, v_BSHD).astype(jnp.float32) * dout_BSHD.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def make_inputs(shape_BSHD: tuple[int, ...], dtype: str, seed: int):
    """q, k, v, dout [B, S, H, D], standard normal in `dtype`, fixed per shape."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(k, shape_BSHD, jnp.float32).astype(dtype) for k in keys)


def reference(inputs, causal: bool, pass_: str):
    """The XLA backend in float32 at "highest" matmul precision, from the inputs upcast."""
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(pass_fn(impl_attention("xla", causal, None), pass_))
        return jax.block_until_ready(fn(*(x.astype(jnp.float32) for x in inputs)))


def max_abs_err(result, ref, pass_: str) -> float:
    """Largest |result − ref|: of the output (fwd), of dq, dk and dv (fwd+bwd)."""
    pairs = [(result, ref)] if pass_ == "fwd" else list(zip(result[1], ref[1]))
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in pairs)


# ------------------------------------------------------------------ timing


def time_rounds(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                on_error: Callable[[str, Exception], None]) -> dict[str, list[float]]:
    """Per-call wall times, one call of each per round, the order rotating every round.
    A call that raises is reported to on_error and dropped."""
    live = dict(calls)
    for name in list(live):
        try:
            for _ in range(warmup):
                jax.block_until_ready(live[name]())
        except Exception as e:  # noqa: BLE001 - a backend failing is a result, not a crash
            on_error(name, e)
            del live[name]
    names = list(live)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name not in live:
                continue
            t0 = time.perf_counter()
            try:
                jax.block_until_ready(live[name]())
            except Exception as e:  # noqa: BLE001
                on_error(name, e)
                del live[name]
                continue
            times[name].append(time.perf_counter() - t0)
    return {n: ts for n, ts in times.items() if n in live}


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class Bench:
    """Runs the configurations; keeps the jitted functions, the errors and the last reference."""

    def __init__(self, settings: Settings, dtype: str, eager_pallas: bool):
        self.s, self.dtype, self.eager_pallas = settings, dtype, eager_pallas
        self.fns: dict[tuple, Callable] = {}
        self.errors: dict[tuple, float | None] = {}
        self.ref_key, self.ref = None, None
        self.skipped: list[str] = []

    def skip(self, name: str, where: str, why: str) -> None:
        line = f"skipping {name}{where}: {why}"
        self.skipped.append(line)
        print(line, file=sys.stderr, flush=True)

    def inputs(self, S: int, D: int):
        return make_inputs((self.s.batch, S, self.s.heads, D), self.dtype, 0)

    def fn(self, name: str, causal: bool, pass_: str) -> tuple[Callable, bool]:
        """(function of (q, k, v, dout), eager?); one jit object per backend, mask and pass."""
        backend, bs = self.s.impls[name]
        eager = backend == "pallas" and self.eager_pallas
        key = (name, causal, pass_)
        if key not in self.fns:
            f = pass_fn(impl_attention(backend, causal, bs), pass_)
            self.fns[key] = f if eager else jax.jit(f)
        return self.fns[key], eager

    def prepare(self, name: str, causal: bool, pass_: str, inputs) -> tuple[Callable[[], Any], float]:
        """(call, compile_s): compiled ahead of time, or for eager Pallas after one untimed call."""
        fn, eager = self.fn(name, causal, pass_)
        t0 = time.perf_counter()
        if eager:
            jax.block_until_ready(fn(*inputs))
            return (lambda: fn(*inputs)), time.perf_counter() - t0
        compiled = fn.lower(*inputs).compile()
        return (lambda: compiled(*inputs)), time.perf_counter() - t0

    def max_err(self, name: str, S: int, D: int, causal: bool, pass_: str, call, inputs) -> tuple[float | None, int]:
        """(max_err, S it was measured at), cached per backend and configuration; `call` and
        `inputs` are the timed ones, used as they are when S is within the cap."""
        S_err = min(S, self.s.max_err_seq_cap)
        key = (name, S_err, D, causal, pass_)
        if key not in self.errors:
            try:
                if S_err == S:
                    result = call()
                else:
                    inputs = self.inputs(S_err, D)
                    result = self.fn(name, causal, pass_)[0](*inputs)
                ref_key = (S_err, D, causal, pass_)
                if self.ref_key != ref_key:
                    self.ref_key, self.ref = None, None  # free the old one first
                    self.ref, self.ref_key = reference(inputs, causal, pass_), ref_key
                self.errors[key] = max_abs_err(result, self.ref, pass_)
            except Exception as e:  # noqa: BLE001
                print(f"max_err of {name} at S={S_err}, D={D}, causal={causal}, {pass_} not measured: {_reason(e)}",
                      file=sys.stderr, flush=True)
                self.errors[key] = None
        return self.errors[key], S_err

    def run_config(self, names: Sequence[str], S: int, D: int, causal: bool, pass_: str, inputs) -> list[dict]:
        where = f" (S={S}, D={D}, causal={causal}, {pass_})"
        calls, compile_s = {}, {}
        for name in names:
            try:
                calls[name], compile_s[name] = self.prepare(name, causal, pass_, inputs)
            except Exception as e:  # noqa: BLE001
                self.skip(name, where, _reason(e))
        times = time_rounds(calls, self.s.warmup, self.s.repeats, lambda n, e: self.skip(n, where, _reason(e)))
        errors = {name: self.max_err(name, S, D, causal, pass_, calls[name], inputs) for name in times}
        extras = {}
        for name in times:
            bs = self.s.impls[name][1]
            extras[name] = {"compile_s": compile_s[name]}
            if self.s.impls[name][0] == "pallas":
                extras[name]["block_sizes"] = dataclasses.asdict(bs or BlockSizes())
        return config_rows(S, D, causal, pass_, self.s.batch, self.s.heads, times, errors, extras)


def available(settings: Settings, backend: str) -> tuple[list[str], list[str]]:
    """(backends to run, skip lines for those this platform lacks)."""
    names, skipped = [], []
    for name, (impl, _) in settings.impls.items():
        if impl == "cudnn" and backend != "gpu":
            skipped.append(f"skipping {name}: cuDNN needs a GPU, the backend is {backend}")
        else:
            names.append(name)
    return names, skipped


def environment(dtype: str) -> dict:
    return {"dtype": dtype, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__}


def main(argv, flag_holders: dict[str, flags.FlagHolder]) -> None:
    del argv
    runtime.apply_xla_defaults()
    f = {name: holder.value for name, holder in flag_holders.items()}
    settings = parse_settings(f["impls"], f["batch"], f["heads"], f["head_dims"], f["seq_lens"], f["causal"],
                              f["repeats"], f["warmup"], f["max_err_seq_cap"], f["pallas_block_sizes"])
    dtype = f["dtype"]
    backend = jax.default_backend()
    env = environment(dtype)
    bench = Bench(settings, dtype, eager_pallas=backend != "gpu")
    names, unavailable = available(settings, backend)
    for line in unavailable:
        bench.skipped.append(line)
        print(line, file=sys.stderr, flush=True)
    out = open(f["out"], "w") if f["out"] else None

    def emit(obj: dict) -> None:
        line = json.dumps(obj, allow_nan=False)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    rows: list[dict] = []
    for D in settings.head_dims:
        for S in settings.seq_lens:
            inputs = bench.inputs(S, D)
            for causal in settings.causals:
                for pass_ in PASSES:
                    for row in bench.run_config(names, S, D, causal, pass_, inputs):
                        rows.append(row)
                        emit({**row, **env})
            del inputs
    print(table(rows, list(settings.impls)), file=sys.stderr, flush=True)
    emit({"summary": "attention",
          **summary_ratios(rows, list(settings.impls), settings.head_dims, settings.causals),
          "skipped": bench.skipped, **env, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"), "B": settings.batch, "H": settings.heads, "repeats": settings.repeats,
          "warmup": settings.warmup, "max_err_seq_cap": settings.max_err_seq_cap, "rows": len(rows)})
    if out:
        out.close()


if __name__ == "__main__":
    app.run(functools.partial(main, flag_holders=define_flags()))
