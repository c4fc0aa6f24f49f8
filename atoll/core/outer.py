"""Outer optimizers of the DiLoCo family, and the pure pieces around them.

Every outer optimizer here is an `optax.GradientTransformation` over the
*pseudo-gradient* Δ = θ_outer − θ_island (sign as in every public DiLoCo:
Δ points from the island's params back to the outer params, so feeding it to
SGD as a gradient moves θ_outer towards the islands). With outer lr 1 and no
momentum the update is θ_outer − mean Δ = mean θ_island: plain averaging.

The communication (what is exchanged, how it is reduced, quantized or
sparsified) lives in `atoll/parallel/islands.py`; this module only holds the
math that runs on each island once the bytes have arrived, plus the pure
schedule (which fragment syncs at which step) so host and device agree on it.

Letters: M islands, H inner steps per outer round, P fragments, τ delay (steps).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("diloco", "fedavg", "streaming_diloco", "noloco", "co2", "async_diloco", "edit", "sparseloco")
PATTERNS = ("strided", "sequential")
WIRE_FORMATS = ("fp32", "bf16", "int8", "fp4")


# ----------------------------------------------------------------------------
# Outer transformations
# ----------------------------------------------------------------------------

def nesterov_sgd(lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> optax.GradientTransformation:
    """DiLoCo's outer step (lr 0.7, momentum 0.9, Nesterov). optax's accumulator
    matches torch.optim.SGD's (no dampening), the reference every DiLoCo uses."""
    if momentum == 0.0:
        return optax.sgd(lr)
    return optax.sgd(lr, momentum=momentum, nesterov=nesterov)


def averaging() -> optax.GradientTransformation:
    """FedAvg: θ_outer ← θ_outer − mean Δ = mean θ_island."""
    return optax.sgd(1.0)


class CO2State(NamedTuple):
    momentum: Any


def co2_momentum(lr: float = 1.0, momentum: float = 0.5, gap_penalty: float = 1.0,
                 clip: float | None = None) -> optax.GradientTransformation:
    """CO2's one-step-delayed outer momentum: m ← clip(β·m + Δ/λ), θ ← θ − lr·m.

    λ (`gap_penalty`) damps the stale pseudo-gradient. Unlike the public
    fairscale-CO2 code (where `torch.clamp`'s result is discarded), the clip
    here really bounds the stored momentum elementwise to [−clip, clip].
    """
    def init(params):
        return CO2State(jax.tree.map(jnp.zeros_like, params))

    def update(delta, state, params=None):
        del params
        m = jax.tree.map(lambda m_, d: momentum * m_ + d / gap_penalty, state.momentum, delta)
        if clip is not None:
            m = jax.tree.map(lambda x: jnp.clip(x, -clip, clip), m)
        return jax.tree.map(lambda x: -lr * x, m), CO2State(m)

    return optax.GradientTransformation(init, update)


def delayed_pseudo_gradient(method: str, phi_now, parked, delta_bar_now):
    """The one-round-delayed outer step: (what to apply now, what to park).

    Both methods all-reduce this round's Δ̄ = φ_start − mean θ and apply it a
    round late, but they differ in what the late update is taken against:
      async_diloco (PCCL's async DiLoCo): park Δ̄ itself and apply it as it
        was, relative to the outer params the round started from;
      co2 (fairscale-CO2's `p_old − p_avg`): park the islands' mean params
        mean θ = φ_start − Δ̄ and, a round later, apply φ_now − mean θ. The
        part of the gap already applied in between is not applied twice,
        which keeps an outer lr of 1 with momentum stable.
    `phi_now` is φ_start here: the outer params have not moved since the
    round began (the delayed step runs once per round).
    """
    if method == "co2":
        mean_theta = [p.astype(jnp.float32) - d for p, d in zip(phi_now, delta_bar_now)]
        return [p.astype(jnp.float32) - q for p, q in zip(phi_now, parked)], mean_theta
    if method == "async_diloco":
        return list(parked), delta_bar_now
    raise ValueError(f"{method!r} has no delayed outer step; delayed methods: co2, async_diloco")


def noloco_pseudo_gradient(phi_i, theta_mean_group):
    """NoLoCo's outer 'gradient' for island i paired with group G.

    The reference update is m ← β·m + η·[mean_G(θ_j − φ_j) + (mean_G φ_j − φ_i)].
    The two group means telescope: mean_G(θ_j − φ_j) + mean_G φ_j − φ_i =
    mean_G θ_j − φ_i, so only the partners' *inner* params need to travel
    (half the bytes of sending θ and φ). With g = φ_i − mean_G θ_j, heavy-ball
    SGD (optax.sgd(η, momentum=β)) gives exactly m ← β·m − η·g.
    """
    return jax.tree.map(lambda p, t: p - t, phi_i, theta_mean_group)


def noloco_momentum(lr: float = 0.7, momentum: float = 0.5) -> optax.GradientTransformation:
    """NoLoCo's outer optimizer (heavy-ball over `noloco_pseudo_gradient`)."""
    return optax.sgd(lr, momentum=momentum, nesterov=False)


# ----------------------------------------------------------------------------
# EDiT's pseudo-gradient penalty
# ----------------------------------------------------------------------------

class EwmaStats(NamedTuple):
    """Per-island EWMA of the pseudo-gradient norm (every island keeps all M)."""
    mean_M: jax.Array
    var_M: jax.Array
    count_M: jax.Array


def edit_init_stats(num_islands: int) -> EwmaStats:
    z = jnp.zeros((num_islands,), jnp.float32)
    return EwmaStats(z, z, jnp.zeros((num_islands,), jnp.int32))


def edit_weights(norms_M: jax.Array, stats: EwmaStats, *, ewma_alpha: float = 0.02, warmup: int = 120,
                 z_threshold: float = 3.0, temperature: float = 1.0) -> tuple[jax.Array, jax.Array, EwmaStats]:
    """EDiT's anomaly elimination and norm-weighted averaging.

    An island whose ‖Δ‖ sits more than `z_threshold` standard deviations above
    its own EWMA (after `warmup` observations) is an anomaly: weight 0, and its
    norm does not enter the statistics. The others are weighted by
    softmax(−‖Δ‖/T). Returns (weights_M summing to 1, or all 0 if every island
    is anomalous; anomalous_M; new stats).
    """
    std_M = jnp.sqrt(jnp.maximum(stats.var_M, 1e-12))
    z_M = (norms_M - stats.mean_M) / std_M
    anomalous_M = (stats.count_M >= warmup) & (z_M > z_threshold)
    logits_M = jnp.where(anomalous_M, -jnp.inf, -norms_M / temperature)
    any_ok = jnp.any(~anomalous_M)
    weights_M = jnp.where(any_ok, jax.nn.softmax(jnp.where(any_ok, logits_M, 0.0)), 0.0)
    first_M = stats.count_M == 0
    diff_M = norms_M - stats.mean_M
    mean_M = jnp.where(first_M, norms_M, stats.mean_M + ewma_alpha * diff_M)
    var_M = jnp.where(first_M, 0.0, (1 - ewma_alpha) * (stats.var_M + ewma_alpha * diff_M ** 2))
    new = EwmaStats(
        jnp.where(anomalous_M, stats.mean_M, mean_M),
        jnp.where(anomalous_M, stats.var_M, var_M),
        stats.count_M + (~anomalous_M).astype(jnp.int32),
    )
    return weights_M, anomalous_M, new


def clip_by_global_norm(tree, max_norm: float | None):
    """EDiT's final clip of the averaged pseudo-gradient (None = off)."""
    if max_norm is None:
        return tree
    norm = optax.tree.norm(tree)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda x: x * scale, tree)


# ----------------------------------------------------------------------------
# Heterogeneous islands (FedCompass / A-EDiT): different speeds, one round
# ----------------------------------------------------------------------------

HETEROGENEITY_MODES = ("wait_for_slowest", "heterogeneous")


@dataclasses.dataclass(frozen=True)
class IslandSchedule:
    """Who takes an inner step when, and who contributes to which outer step,
    for islands of different speeds (FedCompass / A-EDiT style).

    Island i takes `steps_M[i]` inner steps in every period of `rounds_M[i]`
    outer rounds (H ticks each; a tick is one step of the fastest island),
    spread evenly over the period, and sends its pseudo-gradient at the
    period's end, `rounds_M[i] − 1` rounds stale. The outer mean weights the
    senders by tokens processed (∝ steps), times (1 + staleness)^−a with
    a = `staleness_power`. The methods take numpy or traced jnp step counts
    alike, so host and device agree on the schedule without talking.
    """
    H: int
    steps_M: tuple[int, ...]
    rounds_M: tuple[int, ...]
    staleness_power: float = 0.0

    @property
    def uniform(self) -> bool:
        """Every island takes every step and sends every round: plain DiLoCo."""
        return all(k == self.H for k in self.steps_M) and all(r == 1 for r in self.rounds_M)

    def _period(self):
        return np.asarray(self.steps_M), np.asarray(self.rounds_M) * self.H

    def active(self, step):
        """[M] bool: does island i take inner step `step` (1-based tick)?"""
        k, L = self._period()
        v = (step - 1) % L  # position of this tick in the island's period
        return (v + 1) * k // L > v * k // L

    def steps_done(self, step):
        """[M] inner steps each island has taken after `step` ticks."""
        k, L = self._period()
        return (step // L) * k + (step % L) * k // L

    def weights(self, step):
        """[M] weights of the islands' pseudo-gradients in the outer step after
        tick `step` (a multiple of H); 0 for islands not sending this round."""
        k, r = np.asarray(self.steps_M, np.float32), np.asarray(self.rounds_M)
        sending = (step // self.H) % r == 0
        w_M = sending * k * (1.0 + (r - 1).astype(np.float32)) ** np.float32(-self.staleness_power)
        return w_M / w_M.sum()  # the fastest island sends every round, so the sum is > 0


def island_schedule(speeds_M: Sequence[float], H: int, mode: str = "heterogeneous", *, min_steps: int = 1,
                    staleness_power: float = 0.0) -> IslandSchedule:
    """The schedule for islands of relative speeds `speeds_M` (step rates; 1 = reference).

    "wait_for_slowest": every island takes H steps per round, so the round
    lasts as long as the slowest island needs. "heterogeneous": a round lasts
    as long as the fastest island needs for H steps and island i takes the
    floor(H·s_i / max s) steps that fit. An island that would fit fewer than
    `min_steps` per round works over ceil(min_steps / (H·s_i / max s)) rounds
    instead and sends a stale pseudo-gradient at the end of them.
    """
    if H < 1:
        raise ValueError(f"H must be >= 1, got {H}")
    if not 1 <= min_steps <= H:
        raise ValueError(f"min_steps must be between 1 and H = {H}, got {min_steps}")
    if not speeds_M or any(not (s > 0) for s in speeds_M):
        raise ValueError(f"island speeds must be positive, got {list(speeds_M)}")
    if mode not in HETEROGENEITY_MODES:
        raise ValueError(f"heterogeneity mode {mode!r}: choose one of {list(HETEROGENEITY_MODES)}")
    M = len(speeds_M)
    if mode == "wait_for_slowest":
        return IslandSchedule(H, (H,) * M, (1,) * M, staleness_power)
    fastest = max(speeds_M)
    steps, rounds = [], []
    for s in speeds_M:
        per_round = H * s / fastest
        r = max(1, math.ceil(min_steps / per_round - 1e-9))
        # the small slack keeps 30 · 0.5 / 1 at 15 despite float rounding
        steps.append(max(1, int(r * per_round + 1e-9)))
        rounds.append(r)
    return IslandSchedule(H, tuple(steps), tuple(rounds), staleness_power)


def round_seconds(speeds_M: Sequence[float], schedule: IslandSchedule, step_time_s: float) -> float:
    """Compute wall-clock of one round: the last island to finish its share
    (an island of speed s takes step_time_s / s per step; one spanning r
    rounds does 1/r of its steps per round)."""
    return max(k * step_time_s / (s * r) for k, r, s in zip(schedule.steps_M, schedule.rounds_M, speeds_M))


def speeds_from_step_seconds(step_seconds_M: Sequence[float]) -> list[float]:
    """Relative speeds from measured per-island step times (fastest = 1)."""
    if not step_seconds_M or any(not (t > 0) for t in step_seconds_M):
        raise ValueError(f"island step times must be positive, got {list(step_seconds_M)}")
    return [min(step_seconds_M) / t for t in step_seconds_M]


# ----------------------------------------------------------------------------
# Method settings and the outer optimizer each one uses
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OuterSpec:
    """A validated `config.outer` (see atoll/configs/lm.py for the recipes)."""
    method: str
    H: int
    lr: float
    momentum: float
    nesterov: bool = True
    fragments: int = 1
    pattern: str = "strided"
    tau: int = 0
    alpha: float = 0.0
    quantization: str = "fp32"
    # NoLoCo
    seed: int = 0
    # CO2
    gap_penalty: float = 1.0
    clip: float | None = None
    # EDiT
    edit_warmup: int = 120
    edit_ewma_alpha: float = 0.02
    edit_z_threshold: float = 3.0
    edit_temperature: float = 1.0
    edit_clip: float | None = None
    # SparseLoCo
    topk_chunk: int = 4096
    topk_k: int = 64
    topk_bins: int = 4
    ef_decay: float = 0.95

    @property
    def delayed(self) -> bool:
        """One-round-delayed application (CO2, async DiLoCo)."""
        return self.method in ("co2", "async_diloco")


def outer_transform(spec: OuterSpec) -> optax.GradientTransformation:
    m = spec.method
    if m == "fedavg":
        return averaging()
    if m in ("diloco", "streaming_diloco", "edit", "async_diloco"):
        return nesterov_sgd(spec.lr, spec.momentum, spec.nesterov)
    if m == "noloco":
        return noloco_momentum(spec.lr, spec.momentum)
    if m == "co2":
        return co2_momentum(spec.lr, spec.momentum, spec.gap_penalty, spec.clip)
    if m == "sparseloco":
        return optax.sgd(spec.lr)  # error feedback replaces outer momentum
    raise ValueError(f"unknown outer method {m!r}; choose one of {list(METHODS)}")


# ----------------------------------------------------------------------------
# Fragments and the sync schedule
# ----------------------------------------------------------------------------

class Piece(NamedTuple):
    """Part of one params leaf: the whole leaf (layers None) or the given
    slices along a scanned leaf's leading layer axis."""
    leaf: int
    layers: tuple[int, ...] | None


_BLOCK = re.compile(r"\['block_(\d+)'\]")


def fragment_of_layer(layer: int, num_layers: int, fragments: int, pattern: str = "strided") -> int:
    """Strided: layer l → l mod P (fragment p = layers p, p+P, ...); sequential: contiguous blocks."""
    if pattern == "strided":
        return layer % fragments
    if pattern == "sequential":
        return layer * fragments // num_layers
    raise ValueError(f"fragment pattern {pattern!r}: choose one of {list(PATTERNS)}")


def fragment_plan(paths: Sequence[str], shapes: Sequence[tuple[int, ...]], num_layers: int,
                  fragments: int, pattern: str = "strided") -> list[list[Piece]]:
    """Splits the params into `fragments` groups of whole transformer layers.

    Layer l goes to fragment l % P (strided, Streaming DiLoCo's default) or to
    l·P // L (sequential). The embedding travels with layer 0, the final norm
    and head with layer L−1. Scanned stacks (`blocks`, layer axis first) are
    cut into per-layer slices. `paths` are jax keystrs of the params leaves.
    """
    if not 1 <= fragments <= num_layers:
        raise ValueError(f"fragments = {fragments} must be between 1 and the number of layers ({num_layers})")
    if pattern not in PATTERNS:
        raise ValueError(f"fragment pattern {pattern!r}: choose one of {list(PATTERNS)}")

    def frag_of(layer: int) -> int:
        return fragment_of_layer(layer, num_layers, fragments, pattern)

    plan: list[list[Piece]] = [[] for _ in range(fragments)]
    for i, (path, shape) in enumerate(zip(paths, shapes)):
        block = _BLOCK.search(path)
        if block:
            plan[frag_of(int(block.group(1)))].append(Piece(i, None))
        elif "['blocks']" in path:
            if not shape or shape[0] != num_layers:
                raise ValueError(f"scanned leaf {path} has shape {shape}; expected layer axis {num_layers} first")
            for f in range(fragments):
                layers = tuple(l for l in range(num_layers) if frag_of(l) == f)
                plan[f].append(Piece(i, layers))
        elif "embedding" in path:
            plan[frag_of(0)].append(Piece(i, None))
        else:
            plan[frag_of(num_layers - 1)].append(Piece(i, None))
    return plan


def take_pieces(leaves: Sequence[jax.Array], pieces: Sequence[Piece], axis: int = 0) -> list[jax.Array]:
    """The arrays of one fragment (layer slices taken along `axis`)."""
    out = []
    for p in pieces:
        x = leaves[p.leaf]
        out.append(x if p.layers is None else jnp.take(x, jnp.asarray(p.layers), axis=axis))
    return out


def put_pieces(leaves: Sequence[jax.Array], pieces: Sequence[Piece], values: Sequence[jax.Array],
               axis: int = 0) -> list[jax.Array]:
    """`leaves` with one fragment's arrays replaced by `values`."""
    out = list(leaves)
    for p, v in zip(pieces, values):
        if p.layers is None:
            out[p.leaf] = v
        else:
            idx = (slice(None),) * axis + (jnp.asarray(p.layers),)
            out[p.leaf] = out[p.leaf].at[idx].set(v)
    return out


def fragment_offsets(H: int, fragments: int) -> list[int]:
    """Step (mod H) at which each fragment's sync starts: staggered by H/P
    (rounded when P does not divide H), the last fragment on the round
    boundary, so P = 1 is plain DiLoCo."""
    return [round((f + 1) * H / fragments) % H for f in range(fragments)]


class Event(NamedTuple):
    kind: str       # "send" (reduce a fragment), "apply" (outer step on it), "sync" (both at once)
    fragment: int


def events_at(step: int, spec: OuterSpec) -> list[Event]:
    """What happens after inner step `step` (1-based count of inner steps done).

    Sends and applies are ordered so that an apply for a fragment never comes
    before its own send; every island computes the same list, so collectives
    line up in the same order everywhere (torchft's deadlock lesson is free in SPMD).
    """
    if step <= 0:
        return []
    if spec.method != "streaming_diloco":
        return [Event("sync", 0)] if step % spec.H == 0 else []
    events = []
    for f, off in enumerate(fragment_offsets(spec.H, spec.fragments)):
        if spec.tau == 0:
            if step % spec.H == off:
                events.append(Event("sync", f))
            continue
        if step - spec.tau > 0 and (step - spec.tau) % spec.H == off:
            events.append(Event("apply", f))
        if step % spec.H == off:
            events.append(Event("send", f))
    return events


def noloco_partners(num_islands: int, seed: int, round_index: int) -> tuple[int, ...]:
    """partner[i] for NoLoCo's round: a random perfect matching from a shared
    seed (every island draws the same one without talking)."""
    if num_islands % 2:
        raise ValueError(f"NoLoCo pairs islands: the island count ({num_islands}) must be even")
    order = np.random.default_rng([seed, round_index]).permutation(num_islands)
    partner = [0] * num_islands
    for a, b in zip(order[0::2], order[1::2]):
        partner[a], partner[b] = int(b), int(a)
    return tuple(partner)
