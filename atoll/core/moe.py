"""Mixture-of-experts FFN: routers, dispatch, balance losses. Pure (no mesh).

Shape letters, besides transformer.py's: G routing groups (one sequence
each), S tokens per group, E experts, K experts per token (top-k), C slots
per expert per group (capacity), F an expert's hidden width, A assignments
(token, choice) pairs.

Routers (`MoeConfig.router`):
  softmax_topk   p = softmax(logits); each token takes its k largest p; weights
                 are those p (they sum to ≤ 1; Switch / GShard)
  topk_softmax   each token takes its k largest logits; weights = softmax over
                 those k (they sum to 1; Mixtral)
  expert_choice  each expert takes its C highest-p tokens of the group (Zhou et
                 al. 2022; Nucleus-Image). Every expert is exactly full; a token
                 may reach 0..E experts. In a causal LM a token's routing then
                 depends on later tokens of its sequence: fine for studying
                 routing, not for sampling.
Dispatch (`MoeConfig.dispatch`, token choice only):
  capacity       C = ceil(capacity_factor · S · K / E) slots per expert and group;
                 first choices fill before second choices, earlier tokens first;
                 overflow is dropped (the residual stream carries the token on)
  dropless       assignments sorted by expert, one grouped matmul per weight
                 (atoll.kernels.grouped_matmul): nothing is dropped
Balance: the Switch load-balancing loss over the batch, a per-sequence
("expert-level", DeepSeek-V2/V3) balance loss, the router z-loss (ST-MoE),
each with a weight; and DeepSeek-V3's auxiliary-loss-free bias: a per-expert
bias added to the scores for choosing experts only, nudged after every step
toward uniform load (`balance_bias_update`; the train step applies it; the
inner optimizer never owns it). The bias is a param, so checkpoints carry it
and island training averages it like the rest: the outer optimizer (momentum
included) treats an island's bias change as part of its pseudo-gradient.
Shared experts (DiT-MoE, DeepSeek): dense SwiGLU experts every token passes.

Capacity dispatch and expert choice work per group (vmapped), so a batch split
over devices stays split. Dropless sorts the whole batch's assignments (XLA
cannot vmap ragged_dot over groups with shared weights); train_lm refuses it
when the batch is split over several devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from atoll.kernels import grouped_matmul

ROUTERS = ("softmax_topk", "topk_softmax", "expert_choice")
DISPATCHES = ("capacity", "dropless")
# Collections the MoE layers write during a training forward pass.
LOSSES, METRICS, LOADS = "moe_losses", "moe_metrics", "moe_load"
COLLECTIONS = (LOSSES, METRICS, LOADS)
# Written only when asked for (apply(..., mutable=[ROUTES])): each token's experts, for routing analysis.
ROUTES = "moe_routes"
BIAS = "balance_bias"


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    num_experts: int = 0  # 0: every block keeps its dense FFN
    top_k: int = 2  # experts per token (expert choice: the average)
    every: int = 1  # the FFN of every `every`-th block is an MoE layer (blocks every-1, 2·every-1, ...)
    router: str = "topk_softmax"
    dispatch: str = "capacity"
    capacity_factor: float = 1.25
    expert_mlp_dim: int = 0  # F; 0: the dense mlp_dim
    num_shared_experts: int = 0
    load_balance_weight: float = 0.01  # Switch loss
    sequence_balance_weight: float = 0.0  # per-sequence (expert-level) balance loss
    z_loss_weight: float = 1e-3
    bias_rate: float = 0.0  # aux-loss-free balancing step (DeepSeek-V3 used 1e-3); 0: off
    grouped_matmul_impl: str | None = None

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dict(cls, d) -> "MoeConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d or {}).items() if k in fields})


# ------------------------------------------------------------------ routing


def router_logits(x_GSD: jax.Array, router_DE: jax.Array) -> jax.Array:
    """Router logits in float32 (routing decisions are precision-sensitive)."""
    return jnp.einsum("gsd,de->gse", x_GSD.astype(jnp.float32), router_DE.astype(jnp.float32))


def top_k_routing(logits_GSE: jax.Array, k: int, order: str, bias_E: jax.Array | None = None):
    """(weights_GSK, experts_GSK) for token-choice routing. `bias_E` shifts the
    scores that choose the experts, never the weights (DeepSeek-V3)."""
    if order == "softmax_topk":
        probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
        score_GSE = probs_GSE if bias_E is None else probs_GSE + bias_E
        _, experts_GSK = jax.lax.top_k(jax.lax.stop_gradient(score_GSE), k)
        return jnp.take_along_axis(probs_GSE, experts_GSK, axis=-1), experts_GSK
    if order == "topk_softmax":
        score_GSE = logits_GSE if bias_E is None else logits_GSE + bias_E
        _, experts_GSK = jax.lax.top_k(jax.lax.stop_gradient(score_GSE), k)
        return jax.nn.softmax(jnp.take_along_axis(logits_GSE, experts_GSK, axis=-1), axis=-1), experts_GSK
    raise ValueError(f"token-choice router order {order!r}: choose softmax_topk or topk_softmax")


def expert_capacity(tokens_per_group: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert and group: ceil(factor · S · K / E), at least 1 and at
    most S (an expert never sees a token twice)."""
    return int(min(tokens_per_group, max(1, math.ceil(capacity_factor * tokens_per_group * k / num_experts))))


def expert_choice_routing(probs_GSE: jax.Array, capacity: int):
    """(weights_GEC, tokens_GEC): each expert's `capacity` highest-probability tokens."""
    weights_GEC, tokens_GEC = jax.lax.top_k(jnp.swapaxes(probs_GSE, 1, 2), capacity)
    return weights_GEC, tokens_GEC


# ------------------------------------------------------------------ dispatch


def capacity_slots(experts_GSK: jax.Array, num_experts: int, capacity: int):
    """(slot_GSK, kept_GSK): each assignment's position in its expert's buffer
    and whether it fits. Priority: all first choices (in token order), then all
    second choices, ... (GShard)."""
    G, S, K = experts_GSK.shape
    onehot_GKSE = jax.nn.one_hot(jnp.swapaxes(experts_GSK, 1, 2), num_experts, dtype=jnp.int32)
    position_GKSE = jnp.cumsum(onehot_GKSE.reshape(G, K * S, num_experts), axis=1).reshape(G, K, S, num_experts)
    slot_GSK = jnp.swapaxes(jnp.sum((position_GKSE - 1) * onehot_GKSE, axis=-1), 1, 2)
    return slot_GSK, slot_GSK < capacity


def dispatch_to_slots(x_GSD, experts_GSK, slot_GSK, kept_GSK, num_experts: int, capacity: int) -> jax.Array:
    """buffer_GECD: every kept assignment's token in its expert's slot; empty slots are zero.
    (vmapped over groups, so a batch split over devices stays split: no gather of G.)"""
    def one(x_SD, e_SK, slot_SK, kept_SK):
        S, D = x_SD.shape
        slot_SK = jnp.where(kept_SK, slot_SK, capacity)  # out of range: dropped by the scatter
        x_SKD = jnp.broadcast_to(x_SD[:, None, :], (S, e_SK.shape[-1], D))
        return jnp.zeros((num_experts, capacity, D), x_SD.dtype).at[e_SK, slot_SK].set(x_SKD, mode="drop")
    return jax.vmap(one)(x_GSD, experts_GSK, slot_GSK, kept_GSK)


def combine_from_slots(y_GECD, experts_GSK, slot_GSK, kept_GSK, weights_GSK) -> jax.Array:
    """out_GSD = Σ_k weight · (expert output of the token's k-th assignment), 0 where dropped."""
    C = y_GECD.shape[2]
    def one(y_ECD, e_SK, slot_SK, kept_SK, w_SK):
        y_SKD = y_ECD[e_SK, jnp.minimum(slot_SK, C - 1)]
        return jnp.einsum("skd,sk->sd", y_SKD, jnp.where(kept_SK, w_SK, 0.0).astype(y_ECD.dtype))
    return jax.vmap(one)(y_GECD, experts_GSK, slot_GSK, kept_GSK, weights_GSK)


def dispatch_by_tokens(x_GSD: jax.Array, tokens_GEC: jax.Array) -> jax.Array:
    """buffer_GECD for expert choice: row c of expert e is token tokens_GEC[g, e, c]."""
    return jax.vmap(lambda x_SD, t_EC: x_SD[t_EC])(x_GSD, tokens_GEC)


def combine_by_tokens(y_GECD, tokens_GEC, weights_GEC, tokens_per_group: int) -> jax.Array:
    def one(y_ECD, t_EC, w_EC):
        out_SD = jnp.zeros((tokens_per_group, y_ECD.shape[-1]), y_ECD.dtype)
        return out_SD.at[t_EC].add(y_ECD * w_EC[..., None].astype(y_ECD.dtype))
    return jax.vmap(one)(y_GECD, tokens_GEC, weights_GEC)


# ------------------------------------------------------------------ experts


class ExpertWeights(NamedTuple):
    gate_EDF: jax.Array
    up_EDF: jax.Array
    down_EFD: jax.Array


def expert_ffn(buffer_GECD: jax.Array, w: ExpertWeights) -> jax.Array:
    """Every expert's SwiGLU on its own slots (the local, single-device path;
    parallel/experts.py swaps in the expert-parallel one)."""
    dt = buffer_GECD.dtype
    gate = jnp.einsum("gecd,edf->gecf", buffer_GECD, w.gate_EDF.astype(dt))
    up = jnp.einsum("gecd,edf->gecf", buffer_GECD, w.up_EDF.astype(dt))
    return jnp.einsum("gecf,efd->gecd", nn.silu(gate) * up, w.down_EFD.astype(dt))


def dropless_ffn(x_GSD, experts_GSK, weights_GSK, w: ExpertWeights, implementation: str | None = None):
    """Every assignment through its expert with no capacity: assignments sorted
    by expert, one grouped matmul per weight, then unsorted and weighted."""
    G, S, D = x_GSD.shape
    K, E = experts_GSK.shape[-1], w.gate_EDF.shape[0]
    dt = x_GSD.dtype
    expert_A = experts_GSK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    x_AD = x_GSD.reshape(G * S, D)[order_A // K]
    sizes_E = jnp.bincount(expert_A, length=E).astype(jnp.int32)
    gmm = functools.partial(grouped_matmul, group_sizes_G=sizes_E, implementation=implementation)
    h_AF = nn.silu(gmm(x_AD, w.gate_EDF.astype(dt))) * gmm(x_AD, w.up_EDF.astype(dt))
    y_sorted_AD = gmm(h_AF, w.down_EFD.astype(dt))
    y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
    return jnp.einsum("gskd,gsk->gsd", y_AD.reshape(G, S, K, D), weights_GSK.astype(dt))


def masked_dense_reference(x_GSD, experts_GSK, weights_GSK, w: ExpertWeights) -> jax.Array:
    """Runs every expert on every token and keeps the chosen ones: the slow
    reference dropless dispatch must equal."""
    E = w.gate_EDF.shape[0]
    dt = x_GSD.dtype
    h = nn.silu(jnp.einsum("gsd,edf->gsef", x_GSD, w.gate_EDF.astype(dt))) * jnp.einsum(
        "gsd,edf->gsef", x_GSD, w.up_EDF.astype(dt))
    y_GSED = jnp.einsum("gsef,efd->gsed", h, w.down_EFD.astype(dt))
    combine_GSE = jnp.sum(jax.nn.one_hot(experts_GSK, E, dtype=dt) * weights_GSK[..., None].astype(dt), axis=2)
    return jnp.einsum("gsed,gse->gsd", y_GSED, combine_GSE)


# ------------------------------------------------------------------ balance


def expert_counts(experts_GSK: jax.Array, num_experts: int) -> jax.Array:
    """counts_E: assignments per expert (before any drop)."""
    return jnp.bincount(experts_GSK.reshape(-1), length=num_experts)


def switch_balance_loss(probs_GSE: jax.Array, experts_GSK: jax.Array) -> jax.Array:
    """E · Σ_e f_e · P_e over the batch (Switch Transformer eq. 4): f_e the fraction
    of assignments to e, P_e the mean router probability of e. 1 when both are
    uniform; larger as routing concentrates."""
    E = probs_GSE.shape[-1]
    f_E = expert_counts(experts_GSK, E) / experts_GSK.size
    P_E = jnp.mean(probs_GSE, axis=(0, 1))
    return E * jnp.sum(f_E * P_E)


def sequence_balance_loss(probs_GSE: jax.Array, experts_GSK: jax.Array) -> jax.Array:
    """The same within each sequence, averaged over sequences (the expert-level
    balance loss of DeepSeek-V2, computed per sequence as in DeepSeek-V3):
    it also penalizes a sequence that sends all its tokens to a few experts
    even when the batch as a whole is balanced."""
    return jnp.mean(jax.vmap(lambda p, e: switch_balance_loss(p[None], e[None]))(probs_GSE, experts_GSK))


def router_z_loss(logits_GSE: jax.Array) -> jax.Array:
    """mean(logsumexp(logits)²) (ST-MoE): keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_GSE, axis=-1)))


def router_entropy(probs_GSE: jax.Array) -> jax.Array:
    """Mean per-token entropy of the router distribution, in nats (log E when uniform)."""
    return jnp.mean(-jnp.sum(probs_GSE * jnp.log(jnp.clip(probs_GSE, 1e-20)), axis=-1))


def balance_bias_update(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free update: raise the bias of under-loaded experts
    by `rate`, lower it for over-loaded ones."""
    counts = counts_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)


def apply_bias_updates(new_params, old_params, loads, rate: float):
    """Sets every `balance_bias` in `new_params` to the update of its value in
    `old_params` (the optimizer does not own these) from the counts in `loads`
    (the moe_load collection, whose tree mirrors the params')."""
    flat_new = traverse_util.flatten_dict(dict(new_params))
    flat_old = traverse_util.flatten_dict(dict(old_params))
    for path, counts in traverse_util.flatten_dict(dict(loads)).items():
        flat_new[path] = balance_bias_update(flat_old[path], counts, rate)
    return traverse_util.unflatten_dict(flat_new)


# ------------------------------------------------------------------ the layer


def _record(module: nn.Module, collection: str, name: str, value) -> None:
    """Stores one value per call (not sow's growing tuple): nn.scan stacks it over layers."""
    module.sow(collection, name, value, init_fn=lambda: 0, reduce_fn=lambda _, v: v)


def _param(init_std: float, *axes: str):
    return nn.with_logical_partitioning(nn.initializers.normal(init_std), axes)


class MoeFfn(nn.Module):
    """The MoE FFN of one block: x_BTD -> y_BTD, each sequence a routing group.

    `expert_fn(buffer_GECD, ExpertWeights) -> y_GECD` runs the experts on their
    slots (capacity dispatch and expert choice); None = `expert_ffn` on this
    device's view. parallel/experts.expert_fn_for(mesh) gives the all-to-all one.
    """

    d_model: int
    mlp_dim: int  # the dense FFN's width: the default expert width
    moe: MoeConfig
    init_std: float
    out_std: float
    dtype: Any
    param_dtype: Any
    expert_fn: Callable | None = None

    @nn.compact
    def __call__(self, x_GSD: jax.Array) -> jax.Array:
        m = self.moe
        D, E, K = self.d_model, m.num_experts, m.top_k
        F = m.expert_mlp_dim or self.mlp_dim
        G, S, _ = x_GSD.shape
        x_GSD = x_GSD.astype(self.dtype)
        router_DE = self.param("router", _param(self.init_std, "embed", "router_experts"), (D, E), self.param_dtype)
        w = ExpertWeights(
            self.param("gate", _param(self.init_std, "expert", "embed", "expert_mlp"), (E, D, F), self.param_dtype),
            self.param("up", _param(self.init_std, "expert", "embed", "expert_mlp"), (E, D, F), self.param_dtype),
            self.param("down", _param(self.out_std, "expert", "expert_mlp", "embed"), (E, F, D), self.param_dtype),
        )
        logits_GSE = router_logits(x_GSD, router_DE)
        probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
        run_experts = self.expert_fn or expert_ffn

        if m.router == "expert_choice":
            C = expert_capacity(S, E, K, m.capacity_factor)
            weights_GEC, tokens_GEC = expert_choice_routing(probs_GSE, C)
            y_GECD = run_experts(dispatch_by_tokens(x_GSD, tokens_GEC), w)
            y_GSD = combine_by_tokens(y_GECD, tokens_GEC, weights_GEC, S)
            counts_E = jnp.full((E,), G * C, jnp.int32)
            _record(self, ROUTES, "expert_tokens", tokens_GEC)
            reached_GS = jax.vmap(lambda t_EC: jnp.zeros((S,), jnp.int32).at[t_EC].add(1))(tokens_GEC)
            drop_rate = jnp.mean((reached_GS == 0).astype(jnp.float32))  # tokens no expert took
            balance = sequence = jnp.zeros((), jnp.float32)
        else:
            bias_E = self.param(BIAS, nn.with_logical_partitioning(nn.initializers.zeros, ("router_experts",)),
                                (E,), jnp.float32) if m.bias_rate > 0 else None
            weights_GSK, experts_GSK = top_k_routing(logits_GSE, K, m.router, bias_E)
            counts_E = expert_counts(experts_GSK, E)
            _record(self, ROUTES, "experts", experts_GSK)
            if m.dispatch == "dropless":
                y_GSD = dropless_ffn(x_GSD, experts_GSK, weights_GSK, w, m.grouped_matmul_impl)
                drop_rate = jnp.zeros((), jnp.float32)
            else:
                C = expert_capacity(S, E, K, m.capacity_factor)
                slot_GSK, kept_GSK = capacity_slots(experts_GSK, E, C)
                y_GECD = run_experts(dispatch_to_slots(x_GSD, experts_GSK, slot_GSK, kept_GSK, E, C), w)
                y_GSD = combine_from_slots(y_GECD, experts_GSK, slot_GSK, kept_GSK, weights_GSK)
                drop_rate = 1.0 - jnp.mean(kept_GSK.astype(jnp.float32))
            balance = switch_balance_loss(probs_GSE, experts_GSK)
            sequence = sequence_balance_loss(probs_GSE, experts_GSK)
            if bias_E is not None:
                _record(self, LOADS, BIAS, counts_E)

        if m.num_shared_experts:
            Fs = F * m.num_shared_experts
            lin = lambda name, shape, axes, std: self.param(name, _param(std, *axes), shape, self.param_dtype)
            gate = x_GSD @ lin("shared_gate", (D, Fs), ("embed", "mlp"), self.init_std).astype(self.dtype)
            up = x_GSD @ lin("shared_up", (D, Fs), ("embed", "mlp"), self.init_std).astype(self.dtype)
            y_GSD = y_GSD + (nn.silu(gate) * up) @ lin("shared_down", (Fs, D), ("mlp", "embed"),
                                                        self.out_std).astype(self.dtype)

        z = router_z_loss(logits_GSE)
        load_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1)
        _record(self, LOSSES, "aux", m.load_balance_weight * balance + m.sequence_balance_weight * sequence
                + m.z_loss_weight * z)
        for name, value in (("load_fraction", load_E), ("max_over_mean_load", jnp.max(load_E) * E),
                            ("drop_rate", drop_rate), ("router_entropy", router_entropy(probs_GSE)),
                            ("z_loss", z), ("balance_loss", balance), ("sequence_balance_loss", sequence)):
            _record(self, METRICS, name, value)
        return y_GSD


# ------------------------------------------------------------------ reading what the layers recorded


def aux_loss(collections: dict) -> jax.Array:
    """The weighted auxiliary losses of every MoE layer, summed (0 for a dense model)."""
    leaves = jax.tree.leaves(collections.get(LOSSES, {}))
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def _natural(path: tuple[str, ...]):
    return [int(t) if t.isdigit() else t for part in path for t in re.split(r"(\d+)", part)]


def stack_by_depth(tree, leaf: str) -> jax.Array:
    """[L_moe, ...]: the `leaf` every MoE layer recorded in one collection's
    tree, in depth order. Unrolled blocks (block_<i>) sort by index; nn.scan's
    stacks ("blocks": [groups, ...]) interleave their positions in a group."""
    flat = traverse_util.flatten_dict(dict(tree))
    paths = sorted((path for path in flat if path[-1] == leaf), key=_natural)
    parts = [flat[path] for path in paths]
    if paths[0][0] == "blocks":
        return jnp.stack(parts, axis=1).reshape(-1, *jnp.shape(parts[0])[1:])
    return jnp.stack(parts)


def layer_metrics(collections: dict) -> dict[str, jax.Array]:
    """{metric: [L_moe, ...]} over the MoE layers in depth order, from the moe_metrics collection."""
    flat = traverse_util.flatten_dict(dict(collections.get(METRICS, {})))
    return {name: stack_by_depth(collections[METRICS], name) for name in sorted({path[-1] for path in flat})}
