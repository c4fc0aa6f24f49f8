"""Context parallelism: forward+backward time and bytes sent per device of the
three strategies of atoll.parallel.context (all_gather, ring, tokenring), each
against the single-device attention it replaces:

    python -m atoll.experiments.bench.context

(defaults: --devices=2,4,8 --seq_lens=4096,16384 --batch=1 --heads=8
--kv_heads=8 --head_dim=128, causal, --implementation=xla). A CPU run that
finishes in a few minutes on two cores:

    python -m atoll.experiments.bench.context --seq_lens=1024,2048 --heads=4 \\
        --kv_heads=4 --head_dim=64 --repeats=5 --warmup=1

On CPU the module asks XLA for max(--devices) fake host devices
(--xla_force_host_platform_device_count, set before JAX starts unless
XLA_FLAGS already sets it; the flag shapes only the host platform). **Those
devices share the machine's cores and have no interconnect**: a "collective"
is a memory copy, so the CPU times show each strategy's compute and
scheduling overhead (block splitting, the log-sum-exp merges, the
lax.switch per step, the extra backward work), not its communication cost.
The bytes are the part that carries over to real hardware.

For every sequence length S and context size C of --devices: a mesh of C
devices with one axis "context" (jax.make_mesh), q [B, S, N, K], k and v
[B, S, H, K] and a cotangent dout [B, S, N, K] (standard normal in --dtype)
laid out in zig-zag order for causal attention
(atoll.parallel.context.zigzag_positions; any layout works without a mask,
the natural one is used) and placed with NamedSharding(mesh, P(None,
"context")). Timed, jitted: jax.value_and_grad of sum(out · dout) in fp32 with
respect to q, k and v, out = jax.shard_map(context_attention(strategy=...,
causal=..., implementation=--implementation)); the output is returned beside
the loss (for max_err). The baseline, row "single_device", is the same step
through atoll.kernels.attention.attention(implementation="xla") on one
device, no sharding, natural order. Per S every call (the baseline and every
(C, strategy)) is compiled ahead of time, called --warmup times, then timed
over --repeats rounds of one call each, the order rotating every round, with
block_until_ready; time_s is the median.

Every row is one JSON line on stdout, these keys first:

  {"strategy", "devices", "seq", "bytes_per_device", "time_s", "max_err"}

  bytes_per_device      the model, atoll.parallel.context.bytes_per_device
                        (...)["total"]: bytes one device sends in the
                        forward and backward of one attention layer
  max_err               largest |difference| from the single-device step, over
                        the output and dq, dk, dv (un-permuted from zig-zag)

then bytes_traced (collective_bytes of the traced step's jaxpr: what the
program really sends; bytes_match says whether it equals the model),
bytes_traced_forward (the same of the forward alone), bytes_forward and
bytes_backward (the model's split), ratio_vs_all_gather and
ratio_vs_single_device (that row's time / this time: > 1 = faster),
time_min_s, time_max_s, compile_s (trace, lower and compile of the step),
bytes_match, B, N, H, K, causal, implementation, dtype, device, backend, jax,
python. The "single_device" row has devices 1 and no bytes.

--trace_only skips the devices, the compiles and the timing: it traces every
(C, strategy) on an abstract mesh with abstract inputs, so the byte model can be
checked at production sizes (any C, any S) on a laptop; time_s, max_err and
the ratios are then null and there is no single_device row:

    python -m atoll.experiments.bench.context --trace_only --devices=8 \
        --seq_lens=65536 --heads=16 --kv_heads=4 --dtype=bfloat16

After the rows: a table on stderr and a summary line on stdout,

  {"summary": "context", "bytes_match": all rows, "bytes_mismatches": [...],
   "max_err": the largest, "<strategy>_vs_all_gather_C<C>_S<S>": ratio,
   "<strategy>_vs_single_device_C<C>_S<S>": ratio, ..., device, jax, date, ...}
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

DEFAULT_DEVICES = ("2", "4", "8")
DEFAULT_SEQ_LENS = ("4096", "16384")


def requested_host_devices(argv: Sequence[str], default: Sequence[str] = DEFAULT_DEVICES) -> int:
    """The largest context size in the command line's --devices (--devices=2,4 or
    --devices 2,4; the default list without one; 1 when unparsable: main reports it)."""
    value = ",".join(default)
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        elif arg == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
    try:
        return max(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        return 1


if __name__ == "__main__":  # before JAX starts: XLA reads XLA_FLAGS when the CPU client is created
    from atoll.parallel import runtime as _runtime

    _runtime.request_host_devices(requested_host_devices(sys.argv[1:]))

import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from atoll.kernels.attention import IMPLEMENTATIONS, attention  # noqa: E402
from atoll.parallel import runtime  # noqa: E402
from atoll.parallel.context import (  # noqa: E402
    CONTEXT_AXIS, STRATEGIES, bytes_per_device, check_length, collective_bytes, context_attention,
    zigzag_positions)

BASELINE = "single_device"
LEADING_KEYS = ("strategy", "devices", "seq", "bytes_per_device", "time_s", "max_err")


def define_flags() -> dict[str, flags.FlagHolder]:
    """The command line's flags, defined only when run as a program (so importing the
    helpers, e.g. from a test, defines no --batch or --out beside other modules' flags)."""
    return {
        "devices": flags.DEFINE_list("devices", list(DEFAULT_DEVICES), "C: context-axis sizes to time."),
        "seq_lens": flags.DEFINE_list("seq_lens", list(DEFAULT_SEQ_LENS), "S: whole-sequence lengths to time."),
        "strategies": flags.DEFINE_list("strategies", list(STRATEGIES), f"Strategies, of {list(STRATEGIES)}."),
        "batch": flags.DEFINE_integer("batch", 1, "B: batch size."),
        "heads": flags.DEFINE_integer("heads", 8, "N: query heads."),
        "kv_heads": flags.DEFINE_integer("kv_heads", 8, "H: key/value heads (N a multiple of H; H < N is GQA)."),
        "head_dim": flags.DEFINE_integer("head_dim", 128, "K: head dim."),
        "dtype": flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                                   "Input dtype. auto: float32 on CPU, bfloat16 elsewhere."),
        "causal": flags.DEFINE_bool("causal", True, "Causal attention (zig-zag layout) or not."),
        "implementation": flags.DEFINE_enum("implementation", "xla", list(IMPLEMENTATIONS),
                                            "Attention kernel of the context strategies (the baseline is xla)."),
        "repeats": flags.DEFINE_integer("repeats", 10, "Timed rounds (one call of each per round)."),
        "warmup": flags.DEFINE_integer("warmup", 2, "Untimed calls of each after compilation."),
        "trace_only": flags.DEFINE_bool(
            "trace_only", False, "Only trace (abstract mesh and shapes: no devices, compile or timing needed) and "
            "report the model's and the traced bytes; time_s and max_err are null, no single_device row."),
        "out": flags.DEFINE_string("out", None, "Also write the JSON lines (rows and summary) to this .jsonl path."),
    }


# ------------------------------------------------------------------ layout and errors (pure)


def layout(S: int, C: int, causal: bool) -> np.ndarray:
    """[S]: the original position of each token as laid out over C devices
    (zig-zag when causal, the natural order otherwise)."""
    return zigzag_positions(S, C) if causal else np.arange(S)


def max_abs_err(got: Sequence[Any], ref: Sequence[Any], positions: np.ndarray) -> float:
    """Largest |got - ref| over paired [B, S, ...] arrays, `got` in the layout
    `positions` (got[:, i] is ref[:, positions[i]])."""
    err = 0.0
    for g, r in zip(got, ref, strict=True):
        g32 = np.asarray(g).astype(np.float32)
        r32 = np.asarray(r).astype(np.float32)[:, positions]
        err = max(err, float(np.max(np.abs(g32 - r32))))
    return err


# ------------------------------------------------------------------ the timed functions


def step_fn(attend: Callable) -> Callable:
    """value_and_grad of sum(out · dout) in fp32 w.r.t. q, k, v; returns ((loss, out), (dq, dk, dv))."""
    def loss(q, k, v, dout):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def forward_fn(attend: Callable) -> Callable:
    return lambda q, k, v, dout: jnp.sum(attend(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))


def single_device_attention(causal: bool) -> Callable:
    return functools.partial(attention, causal=causal, implementation="xla")


def trace_step(attend: Callable, args: Sequence[Any], C: int) -> tuple[Any, float, float]:
    """(the traced jitted step, ready to lower; bytes one device sends in it; in the
    forward alone), the bytes counted in the traced jaxprs."""
    axis = {CONTEXT_AXIS: C}
    traced = jax.jit(step_fn(attend)).trace(*args)
    forward = jax.jit(forward_fn(attend)).trace(*args)
    return traced, collective_bytes(traced.jaxpr, axis), collective_bytes(forward.jaxpr, axis)


def model_bytes(strategy: str, B: int, S: int, N: int, H: int, K: int, C: int, dtype) -> dict[str, float]:
    """The row's model fields from atoll.parallel.context.bytes_per_device."""
    model = bytes_per_device(strategy, B=B, T=S, N=N, H=H, K=K, C=C, dtype_bytes=jnp.dtype(dtype).itemsize)
    return {"bytes_per_device": model["total"], "bytes_forward": model["forward"], "bytes_backward": model["backward"]}


def sharded_attention(mesh, strategy: str, causal: bool, implementation: str) -> Callable:
    spec = P(None, CONTEXT_AXIS)
    return jax.shard_map(
        functools.partial(context_attention, strategy=strategy, causal=causal, axis_name=CONTEXT_AXIS,
                          implementation=implementation),
        mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)


def make_inputs(B: int, S: int, N: int, H: int, K: int, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    """(q, k, v, dout), standard normal in `dtype` (numpy: no XLA compile on the set-up path)."""
    rng = np.random.default_rng(seed)
    shapes = ((B, S, N, K), (B, S, H, K), (B, S, H, K), (B, S, N, K))
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def time_rounds(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per-call wall times, one call of each per round, the order rotating every round."""
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------ rows (pure)


def call_name(strategy: str, C: int) -> str:
    return BASELINE if strategy == BASELINE else f"{strategy}/C{C}"


def make_rows(S: int, devices: Sequence[int], strategies: Sequence[str], times: dict[str, list[float]],
              extras: dict[str, dict]) -> list[dict]:
    """The rows of one sequence length from the round times (keys call_name(strategy, C))
    and each call's extras (bytes_per_device, max_err, bytes_traced, ...): the baseline
    first, then per C each strategy, the LEADING_KEYS first."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for C, strategy in [(1, BASELINE)] + [(C, s) for C in devices for s in strategies]:
        name = call_name(strategy, C)
        if name not in times:
            continue
        extra = dict(extras.get(name, {}))
        ag = call_name("all_gather", C)
        row = {"strategy": strategy, "devices": C, "seq": S,
               "bytes_per_device": extra.pop("bytes_per_device", 0.0), "time_s": med[name],
               "max_err": extra.pop("max_err", None)}
        row.update(extra)
        row["ratio_vs_all_gather"] = med[ag] / med[name] if strategy != BASELINE and ag in med else None
        row["ratio_vs_single_device"] = med[BASELINE] / med[name] if BASELINE in med else None
        row["time_min_s"], row["time_max_s"] = min(times[name]), max(times[name])
        rows.append(row)
    return rows


def bytes_match(row: dict) -> bool:
    """The traced bytes equal the model's: the total, and the forward where both are in the row."""
    def same(model, traced):
        return model is not None and traced is not None and abs(traced - model) <= 1e-9 * max(1.0, abs(model))
    if not same(row["bytes_per_device"], row.get("bytes_traced")):
        return False
    return "bytes_traced_forward" not in row or same(row.get("bytes_forward"), row["bytes_traced_forward"])


def summary(rows: Sequence[dict]) -> dict:
    """Ratios per (strategy, C, S), whether the traced bytes match the model, the largest error."""
    out: dict[str, Any] = {"summary": "context"}
    sharded = [r for r in rows if r["strategy"] != BASELINE]
    out["bytes_match"] = all(bytes_match(r) for r in sharded)
    out["bytes_mismatches"] = [f"{r['strategy']} C={r['devices']} S={r['seq']}: model {r['bytes_per_device']:.0f} "
                               f"(forward {r.get('bytes_forward')}), traced {r.get('bytes_traced')} "
                               f"(forward {r.get('bytes_traced_forward')})" for r in sharded if not bytes_match(r)]
    errs = [r["max_err"] for r in sharded if r["max_err"] is not None]
    out["max_err"] = max(errs) if errs else None
    for r in sharded:
        where = f"C{r['devices']}_S{r['seq']}"
        if r["strategy"] != "all_gather" and r["ratio_vs_all_gather"] is not None:
            out[f"{r['strategy']}_vs_all_gather_{where}"] = r["ratio_vs_all_gather"]
        if r["ratio_vs_single_device"] is not None:
            out[f"{r['strategy']}_vs_single_device_{where}"] = r["ratio_vs_single_device"]
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2.0 ** 20


def table(rows: Sequence[dict]) -> str:
    head = (f"{'strategy':<14}{'C':>3}{'S':>7}{'model MiB':>11}{'traced MiB':>12}{'fwd model':>10}{'fwd traced':>11}"
            f"{'time s':>10}"
            f"{'vs a_g':>8}{'vs 1dev':>9}{'max_err':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['strategy']:<14}{r['devices']:>3}{r['seq']:>7}{_mib(r['bytes_per_device']):>11.2f}"
            f"{_fmt(_mib(r.get('bytes_traced')), '.2f'):>12}"
            f"{_fmt(_mib(r.get('bytes_forward')), '.2f'):>10}{_fmt(_mib(r.get('bytes_traced_forward')), '.2f'):>11}"
            f"{_fmt(r['time_s'], '.4f'):>10}"
            f"{_fmt(r.get('ratio_vs_all_gather'), '.2f'):>8}{_fmt(r.get('ratio_vs_single_device'), '.2f'):>9}"
            f"{_fmt(r['max_err'], '.1e'):>10}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the run


def _ints(flag: str, values: Sequence[str]) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{flag}={','.join(values)}: integers expected") from None
    if not out or min(out) < 1:
        raise app.UsageError(f"--{flag}={','.join(values)}: positive integers expected")
    return out


def validate(devices: Sequence[int], seq_lens: Sequence[int], strategies: Sequence[str], f: dict) -> None:
    for flag in ("batch", "heads", "kv_heads", "head_dim", "repeats"):
        if f[flag] < 1:
            raise app.UsageError(f"--{flag}={f[flag]}: must be at least 1")
    if f["warmup"] < 0:
        raise app.UsageError(f"--warmup={f['warmup']}: must be at least 0")
    if f["heads"] % f["kv_heads"]:
        raise app.UsageError(f"--heads={f['heads']} is not a multiple of --kv_heads={f['kv_heads']}")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise app.UsageError(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")
    if not f["trace_only"] and max(devices) > jax.device_count():
        raise app.UsageError(f"--devices={','.join(map(str, devices))}: only {jax.device_count()} "
                             f"{jax.default_backend()} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    for S in seq_lens:
        for C in devices:
            try:
                check_length(S, C, f["causal"])
            except ValueError as e:
                raise app.UsageError(str(e)) from None


def environment(dtype: str) -> dict:
    return {"dtype": dtype, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version()}


def trace_seq(S: int, devices: Sequence[int], strategies: Sequence[str], f: dict, dtype) -> list[dict]:
    """--trace_only: the model's and the traced bytes of every (C, strategy), on an
    abstract mesh with abstract inputs (any C, any size: nothing is allocated)."""
    B, N, H, K = f["batch"], f["heads"], f["kv_heads"], f["head_dim"]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, S, N, K), (B, S, H, K), (B, S, H, K), (B, S, N, K))]
    rows = []
    for C in devices:
        mesh = jax.sharding.AbstractMesh((C,), (CONTEXT_AXIS,))
        for strategy in strategies:
            _, total, forward = trace_step(sharded_attention(mesh, strategy, f["causal"], f["implementation"]), args, C)
            model = model_bytes(strategy, B, S, N, H, K, C, dtype)
            rows.append({"strategy": strategy, "devices": C, "seq": S,
                         "bytes_per_device": model.pop("bytes_per_device"), "time_s": None, "max_err": None,
                         "bytes_traced": total, "bytes_traced_forward": forward, **model,
                         "ratio_vs_all_gather": None, "ratio_vs_single_device": None,
                         "B": B, "N": N, "H": H, "K": K, "causal": f["causal"], "implementation": f["implementation"]})
    return rows


def run_seq(S: int, devices: Sequence[int], strategies: Sequence[str], f: dict, dtype) -> list[dict]:
    """Compiles, checks and times the baseline and every (C, strategy) at one sequence length."""
    B, N, H, K, causal = f["batch"], f["heads"], f["kv_heads"], f["head_dim"], f["causal"]
    inputs = make_inputs(B, S, N, H, K, dtype)
    calls: dict[str, Callable[[], Any]] = {}
    extras: dict[str, dict] = {}

    t0 = time.perf_counter()
    base = jax.jit(step_fn(single_device_attention(causal))).trace(*inputs)
    compiled = base.lower().compile()
    calls[BASELINE] = lambda c=compiled: c(*inputs)
    (_, ref_out), ref_grads = calls[BASELINE]()
    ref = (ref_out, *ref_grads)
    extras[BASELINE] = {"max_err": 0.0, "bytes_traced": collective_bytes(base.jaxpr, {}),
                        "compile_s": time.perf_counter() - t0}

    for C in devices:
        mesh = jax.make_mesh((C,), (CONTEXT_AXIS,), devices=jax.devices()[:C])
        sharding = NamedSharding(mesh, P(None, CONTEXT_AXIS))
        positions = layout(S, C, causal)
        laid = tuple(jax.device_put(np.asarray(x)[:, positions], sharding) for x in inputs)
        for strategy in strategies:
            name = call_name(strategy, C)
            attend = sharded_attention(mesh, strategy, causal, f["implementation"])
            t0 = time.perf_counter()
            step, total, forward = trace_step(attend, laid, C)
            compiled = step.lower().compile()
            compile_s = time.perf_counter() - t0  # with the tracing
            calls[name] = lambda c=compiled, a=laid: c(*a)
            (_, out), grads = calls[name]()
            model = model_bytes(strategy, B, S, N, H, K, C, dtype)
            extras[name] = {"bytes_per_device": model.pop("bytes_per_device"),
                            "max_err": max_abs_err((out, *grads), ref, positions),
                            "bytes_traced": total, "bytes_traced_forward": forward, **model, "compile_s": compile_s}
            del out, grads
    del ref, ref_out, ref_grads
    times = time_rounds(calls, f["warmup"], f["repeats"])
    common = {"B": B, "N": N, "H": H, "K": K, "causal": causal, "implementation": f["implementation"]}
    rows = make_rows(S, devices, strategies, times, extras)
    for row in rows:
        row.update(common)
        if row["strategy"] == BASELINE:
            row["implementation"] = "xla"
    return rows


def main(argv, flag_holders: dict[str, flags.FlagHolder]) -> None:
    del argv
    runtime.apply_xla_defaults()
    f = {name: holder.value for name, holder in flag_holders.items()}
    devices, seq_lens = _ints("devices", f["devices"]), _ints("seq_lens", f["seq_lens"])
    strategies = list(f["strategies"])
    validate(devices, seq_lens, strategies, f)
    dtype_name = f["dtype"] if f["dtype"] != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    dtype = jnp.dtype(dtype_name)
    env = environment(dtype_name)
    out = open(f["out"], "w") if f["out"] else None

    def emit(obj: dict) -> None:
        line = json.dumps(obj, allow_nan=False)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    rows: list[dict] = []
    for S in seq_lens:
        for row in (trace_seq if f["trace_only"] else run_seq)(S, devices, strategies, f, dtype):
            row["bytes_match"] = bytes_match(row) if row["strategy"] != BASELINE else None
            rows.append(row)
            emit({**row, **env})
    print(table(rows), file=sys.stderr, flush=True)
    emit({**summary(rows), **env, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "devices": devices, "seq_lens": seq_lens, "B": f["batch"], "N": f["heads"], "H": f["kv_heads"],
          "K": f["head_dim"], "causal": f["causal"], "implementation": f["implementation"],
          "trace_only": f["trace_only"], "repeats": f["repeats"], "warmup": f["warmup"],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "rows": len(rows)})
    if out:
        out.close()


if __name__ == "__main__":
    app.run(functools.partial(main, flag_holders=define_flags()))
