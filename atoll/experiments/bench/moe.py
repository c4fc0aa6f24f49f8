"""What an MoE FFN costs against a dense FFN of the same active FLOPs, per
dispatch mode, and what the grouped matmul costs against a dense batched
einsum, in one run:

    python -m atoll.experiments.bench.moe --d_model=256 --experts=8 --top_k=2 \\
        --expert_mlp_dim=512 --batch=8 --seq_len=256

(an H100-sized run, the grouped-matmul shape of shared/research/h100_baseline.md:
--d_model=2048 --expert_mlp_dim=2048 --experts=8 --top_k=2 --batch=8 --seq_len=8192).

On one token batch x [B, T, D] (each sequence a routing group of T tokens) it
times, jitted, after compilation and --warmup untimed calls, with
block_until_ready, a training step's worth of work, `jax.value_and_grad` of
sum(y) with respect to the parameters and x ("step"), and the forward alone:

  dense_ffn          SwiGLU FFN of hidden width K·F: the MoE's active FLOPs
                     without the router. The baseline of the three MoE rows.
  moe_capacity       atoll.core.moe.MoeFfn, token choice (--router), capacity
                     dispatch with C = ceil(--capacity_factor · T · K / E)
  moe_dropless       the same router, dropless dispatch: jax.lax.ragged_dot
                     through atoll.kernels.grouped_matmul
  moe_expert_choice  expert-choice routing, C = ceil(--expert_choice_capacity_factor
                     · T · K / E) tokens per expert (factor 1: K experts per
                     token on average, the active FLOPs of the others)
  grouped_matmul_einsum      one expert matmul alone, x [B·T·K, D] in E equal
                             groups against w [E, D, F], as a dense batched
                             einsum over experts: the baseline of the next row
  grouped_matmul_ragged_dot  the same through atoll.kernels.grouped_matmul
                             (jax.lax.ragged_dot), group sizes passed as data

--grouped_matmul_impl=pallas puts atoll's Pallas kernel under both the
moe_dropless row and the grouped_matmul_ragged_dot row (the row names stay;
the summary's grouped_matmul_impl says which backend ran).

The calls take turns (one of each per round, the order rotating every round),
so a machine that speeds up or slows down moves them alike; each time is the
median over --repeats rounds. Every row is a JSON line:

  step_time_s, forward_time_s  medians (s)
  tokens_per_sec               B·T / step_time_s
  active_flops                 forward matmul FLOPs per token that do useful
                               work, 2 per multiply-add: router 2·D·E plus
                               2·3·D·F per expert the token passes (K; for
                               expert choice E·C/T on average)
  executed_flops               forward matmul FLOPs per token the algorithm
                               runs: capacity dispatch runs all E·C slots,
                               empty or not, 2·D·E + 6·D·F·E·C/T
  xla_flops, xla_train_flops   XLA's cost analysis of the compiled forward /
                               step, per token (elementwise work included).
                               It shows lowerings that do more than the
                               algorithm: on CPU ragged_dot is a masked dense
                               dot over all E experts
  executed_tflops_per_sec      3 · executed_flops · B·T / step_time_s / 1e12
  ratio, forward_ratio         throughput over the row's `baseline`
                               (baseline time / this time; > 1 = faster)
  ratio_min, ratio_max         the spread of the per-round step ratios (noise)
  drop_rate                    MoE rows: fraction of assignments dropped
                               (capacity) or tokens no expert took (expert
                               choice) at this random init. The timed MoE
                               calls return it beside the loss (one mean;
                               the layer's other metrics are pruned)

The last line is the summary (throughput ratios of the step, > 1 = faster
than the baseline): {"moe_vs_dense_capacity", "moe_vs_dense_dropless",
"moe_vs_dense_expert_choice", "ragged_dot_vs_einsum", "device", "jax", ...}.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from atoll.core import moe
from atoll.kernels import grouped_matmul
from atoll.parallel import runtime

_D = flags.DEFINE_integer("d_model", 256, "D: model width.")
_E = flags.DEFINE_integer("experts", 8, "E: number of experts.")
_K = flags.DEFINE_integer("top_k", 2, "K: experts per token.")
_F = flags.DEFINE_integer("expert_mlp_dim", 512, "F: an expert's hidden width (the dense FFN gets K·F).")
_B = flags.DEFINE_integer("batch", 8, "B: sequences (routing groups).")
_T = flags.DEFINE_integer("seq_len", 256, "T: tokens per sequence.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype (params stay float32). auto: float32 on CPU, bfloat16 elsewhere.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds (one call of each function per round).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each function after compilation.")
_CAPACITY_FACTOR = flags.DEFINE_float("capacity_factor", 1.25, "Capacity dispatch: slots per expert over T·K/E.")
_EC_FACTOR = flags.DEFINE_float("expert_choice_capacity_factor", 1.0,
                                "Expert choice: tokens per expert over T·K/E (1: K experts per token on average).")
_ROUTER = flags.DEFINE_enum("router", "topk_softmax", ["topk_softmax", "softmax_topk"], "Token-choice router.")
_GMM_IMPL = flags.DEFINE_enum("grouped_matmul_impl", "auto", ["auto", "xla", "pallas", "dense"],
                              "Backend of atoll.kernels.grouped_matmul for the moe_dropless and "
                              "grouped_matmul_ragged_dot rows (auto: implementation=None, today ragged_dot).")
_FORWARD = flags.DEFINE_bool("forward", True, "Also time the forward alone.")

INIT_STD = 0.02
MOE_ROWS = ("moe_capacity", "moe_dropless", "moe_expert_choice")


# ------------------------------------------------------------------ FLOPs


def ffn_flops_per_token(D: int, F: int, experts_per_token: float, E: int = 0) -> float:
    """Forward matmul FLOPs per token, 2 per multiply-add: a router D·E (E=0:
    none) and a SwiGLU's three D×F matmuls per expert the token passes."""
    return float(2 * D * E + 6 * D * F * experts_per_token)


def slots_per_token(E: int, C: int, T: int) -> float:
    """Expert slots run per token when each of E experts runs C slots per group of T tokens."""
    return E * C / T


def flop_counts(D: int, E: int, K: int, F: int, T: int, capacity_factor: float,
                expert_choice_factor: float) -> dict[str, dict[str, float]]:
    """{row: {"active_flops", "executed_flops", "capacity"}} for the dense and MoE rows
    (forward, per token) and for one grouped matmul of the grouped-matmul rows."""
    C = moe.expert_capacity(T, E, K, capacity_factor)
    C_ec = moe.expert_capacity(T, E, K, expert_choice_factor)
    dense = ffn_flops_per_token(D, K * F, 1)
    routed = ffn_flops_per_token(D, F, K, E)
    capacity = ffn_flops_per_token(D, F, slots_per_token(E, C, T), E)
    ec = ffn_flops_per_token(D, F, slots_per_token(E, C_ec, T), E)
    gmm = float(2 * K * D * F)  # one of the three expert matmuls, alone
    return {
        "dense_ffn": {"active_flops": dense, "executed_flops": dense, "capacity": None},
        "moe_capacity": {"active_flops": routed, "executed_flops": capacity, "capacity": C},
        "moe_dropless": {"active_flops": routed, "executed_flops": routed, "capacity": None},
        "moe_expert_choice": {"active_flops": ec, "executed_flops": ec, "capacity": C_ec},
        "grouped_matmul_einsum": {"active_flops": gmm, "executed_flops": gmm, "capacity": None},
        "grouped_matmul_ragged_dot": {"active_flops": gmm, "executed_flops": gmm, "capacity": None},
    }


# ------------------------------------------------------------------ the timed functions


def dense_ffn(params: dict, x_BTD: jax.Array) -> jax.Array:
    """SwiGLU x -> (silu(x·gate) ⊙ x·up)·down, computed in x's dtype."""
    dt = x_BTD.dtype
    h_BTF = nn.silu(x_BTD @ params["gate"].astype(dt)) * (x_BTD @ params["up"].astype(dt))
    return h_BTF @ params["down"].astype(dt)


def normal_params(rng: np.random.Generator, shapes) -> Any:
    """INIT_STD-normal float32 weights of the given shapes (numpy: no XLA compile on the set-up path)."""
    return jax.tree.map(lambda s: jnp.asarray(INIT_STD * rng.standard_normal(s.shape, np.float32)), shapes)


def dense_shapes(D: int, F: int) -> dict:
    return {"gate": jax.ShapeDtypeStruct((D, F), jnp.float32), "up": jax.ShapeDtypeStruct((D, F), jnp.float32),
            "down": jax.ShapeDtypeStruct((F, D), jnp.float32)}


def moe_layer(D: int, E: int, K: int, F: int, dtype, router: str, dispatch: str, capacity_factor: float,
              grouped_matmul_impl: str | None = None) -> moe.MoeFfn:
    cfg = moe.MoeConfig(num_experts=E, top_k=K, router=router, dispatch=dispatch,
                        capacity_factor=capacity_factor, expert_mlp_dim=F, grouped_matmul_impl=grouped_matmul_impl)
    return moe.MoeFfn(d_model=D, mlp_dim=F, moe=cfg, init_std=INIT_STD, out_std=INIT_STD, dtype=dtype,
                      param_dtype=jnp.float32)


def einsum_grouped(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """The grouped matmul's work with equal groups, as a dense batched einsum."""
    del group_sizes_E  # equal by construction
    E, D = w_EDF.shape[:2]
    y_EMF = jnp.einsum("emd,edf->emf", x_MD.reshape(E, -1, D), w_EDF, preferred_element_type=jnp.float32)
    return y_EMF.reshape(x_MD.shape[0], -1).astype(x_MD.dtype)


def ragged_grouped(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array,
                   implementation: str | None = None) -> jax.Array:
    return grouped_matmul(x_MD, w_EDF, group_sizes_E, implementation=implementation)


def moe_apply(layer: moe.MoeFfn) -> Callable:
    """(params, x) -> (y, {"drop_rate"}): the layer with only its drop rate
    recorded (XLA prunes the other metrics)."""
    def apply(params, x_BTD):
        y_BTD, col = layer.apply(params, x_BTD, mutable=[moe.METRICS])
        return y_BTD, {"drop_rate": col[moe.METRICS]["drop_rate"]}
    return apply


def no_aux(fn: Callable) -> Callable:
    return lambda *args: (fn(*args), {})


def train_and_forward(apply: Callable, num_diff: int):
    """(step, forward) for `apply(*args) -> (y, aux)`: value_and_grad of
    sum(y) in float32 with respect to the first `num_diff` arguments, and that
    loss alone; both return (loss, aux)."""
    def loss(*args):
        y, aux = apply(*args)
        return jnp.sum(y.astype(jnp.float32)), aux
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_diff)), has_aux=True)), jax.jit(loss)


# ------------------------------------------------------------------ timing


def cost_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of a compiled program (None where the backend has none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_all(fns: dict[str, tuple[Callable, tuple]]) -> tuple[dict[str, Callable], dict[str, dict]]:
    """Compiles every jitted fn on its args; ({name: () -> out}, {name: {compile_s, xla_flops}})."""
    calls, info = {}, {}
    for name, (fn, args) in fns.items():
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        info[name] = {"compile_s": time.perf_counter() - t0, "xla_flops": cost_flops(compiled)}
        calls[name] = lambda c=compiled, a=args: c(*a)
    return calls, info


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


def make_row(name: str, baseline: str, times: dict[str, list[float]], info: dict[str, dict],
             counts: dict[str, float], tokens: int) -> dict:
    """One JSON row from the step times (key `name`) and forward times (`name/forward`)."""
    step, base = times[name], times[baseline]
    dt, dt_base = statistics.median(step), statistics.median(base)
    per_round = [b / s for b, s in zip(base, step)]
    row = {"name": name, "baseline": baseline, "step_time_s": dt, "tokens_per_sec": tokens / dt,
           "ratio": dt_base / dt, "ratio_min": min(per_round), "ratio_max": max(per_round), **counts,
           "executed_tflops_per_sec": 3 * counts["executed_flops"] * tokens / dt / 1e12}
    train_flops = info[name]["xla_flops"]
    row["xla_train_flops"] = train_flops / tokens if train_flops is not None else None
    fwd = f"{name}/forward"
    if fwd in times:
        fdt = statistics.median(times[fwd])
        row.update(forward_time_s=fdt, forward_ratio=statistics.median(times[f"{baseline}/forward"]) / fdt)
        fwd_flops = info[fwd]["xla_flops"]
        row["xla_flops"] = fwd_flops / tokens if fwd_flops is not None else None
    row["compile_s"] = info[name]["compile_s"]
    return row


def summary(rows: dict[str, dict]) -> dict:
    return {"moe_vs_dense_capacity": rows["moe_capacity"]["ratio"],
            "moe_vs_dense_dropless": rows["moe_dropless"]["ratio"],
            "moe_vs_dense_expert_choice": rows["moe_expert_choice"]["ratio"],
            "ragged_dot_vs_einsum": rows["grouped_matmul_ragged_dot"]["ratio"],
            "forward_moe_vs_dense_capacity": rows["moe_capacity"].get("forward_ratio"),
            "forward_moe_vs_dense_dropless": rows["moe_dropless"].get("forward_ratio"),
            "forward_moe_vs_dense_expert_choice": rows["moe_expert_choice"].get("forward_ratio"),
            "forward_ragged_dot_vs_einsum": rows["grouped_matmul_ragged_dot"].get("forward_ratio")}


def validate(D: int, E: int, K: int, F: int, B: int, T: int) -> None:
    for flag, value in (("d_model", D), ("experts", E), ("top_k", K), ("expert_mlp_dim", F), ("batch", B),
                        ("seq_len", T), ("repeats", _REPEATS.value)):
        if value < 1:
            raise app.UsageError(f"--{flag}={value}: must be at least 1")
    if K > E:
        raise app.UsageError(f"--top_k={K} exceeds --experts={E}")
    if (B * T * K) % E:
        raise app.UsageError(f"--batch·--seq_len·--top_k = {B * T * K} assignments do not split into "
                             f"--experts={E} equal groups (needed by the grouped-matmul rows)")


def main(argv) -> None:
    del argv
    runtime.apply_xla_defaults()
    D, E, K, F, B, T = _D.value, _E.value, _K.value, _F.value, _B.value, _T.value
    validate(D, E, K, F, B, T)
    dtype_name = _DTYPE.value if _DTYPE.value != "auto" else (
        "float32" if jax.default_backend() == "cpu" else "bfloat16")
    dtype = jnp.dtype(dtype_name)
    tokens = B * T
    gmm_impl = None if _GMM_IMPL.value == "auto" else _GMM_IMPL.value
    layers = {
        "moe_capacity": moe_layer(D, E, K, F, dtype, _ROUTER.value, "capacity", _CAPACITY_FACTOR.value),
        "moe_dropless": moe_layer(D, E, K, F, dtype, _ROUTER.value, "dropless", _CAPACITY_FACTOR.value, gmm_impl),
        "moe_expert_choice": moe_layer(D, E, K, F, dtype, "expert_choice", "capacity", _EC_FACTOR.value),
    }
    M = tokens * K
    rng = np.random.default_rng(0)
    x_BTD = jnp.asarray(rng.standard_normal((B, T, D), np.float32), dtype)
    x_MD = jnp.asarray(rng.standard_normal((M, D), np.float32), dtype)
    w_EDF = jnp.asarray(INIT_STD * rng.standard_normal((E, D, F), np.float32), dtype)
    dense_params = normal_params(rng, dense_shapes(D, K * F))
    # The same weights for all three MoE rows; shapes from the layer itself (traced, not compiled).
    moe_shapes = nn.meta.unbox(jax.eval_shape(layers["moe_capacity"].init, jax.random.key(0), x_BTD)["params"])
    moe_params = {"params": normal_params(rng, moe_shapes)}

    fns: dict[str, tuple[Callable, tuple]] = {}
    step, fwd = train_and_forward(no_aux(dense_ffn), 2)
    fns["dense_ffn"], fns["dense_ffn/forward"] = (step, (dense_params, x_BTD)), (fwd, (dense_params, x_BTD))
    for name, layer in layers.items():
        step, fwd = train_and_forward(moe_apply(layer), 2)
        fns[name], fns[f"{name}/forward"] = (step, (moe_params, x_BTD)), (fwd, (moe_params, x_BTD))
    sizes_E = jnp.asarray(np.full((E,), M // E, np.int32))
    grouped = functools.partial(ragged_grouped, implementation=gmm_impl)
    for name, fn in (("grouped_matmul_einsum", einsum_grouped), ("grouped_matmul_ragged_dot", grouped)):
        step, fwd = train_and_forward(no_aux(fn), 2)
        fns[name], fns[f"{name}/forward"] = (step, (x_MD, w_EDF, sizes_E)), (fwd, (x_MD, w_EDF, sizes_E))
    if not _FORWARD.value:
        fns = {n: f for n, f in fns.items() if not n.endswith("/forward")}

    calls, info = compile_all(fns)
    times = time_rounds(calls, _WARMUP.value, _REPEATS.value)
    drop_rates = {name: float(calls[name]()[0][1]["drop_rate"]) for name in MOE_ROWS}
    counts = flop_counts(D, E, K, F, T, _CAPACITY_FACTOR.value, _EC_FACTOR.value)
    common = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "dtype": dtype_name, "d_model": D, "experts": E, "top_k": K, "expert_mlp_dim": F, "batch": B,
              "seq_len": T, "router": _ROUTER.value, "capacity_factor": _CAPACITY_FACTOR.value,
              "expert_choice_capacity_factor": _EC_FACTOR.value, "repeats": _REPEATS.value,
              "grouped_matmul_impl": _GMM_IMPL.value}
    rows = {}
    for name, baseline in (("dense_ffn", "dense_ffn"), *((n, "dense_ffn") for n in MOE_ROWS),
                           ("grouped_matmul_einsum", "grouped_matmul_einsum"),
                           ("grouped_matmul_ragged_dot", "grouped_matmul_einsum")):
        rows[name] = make_row(name, baseline, times, info, counts[name], tokens)
        if name in drop_rates:
            rows[name]["drop_rate"] = drop_rates[name]
    for row in rows.values():
        print(json.dumps({**row, **common}), flush=True)
    print(json.dumps({**summary(rows), **common}), flush=True)


if __name__ == "__main__":
    app.run(main)
