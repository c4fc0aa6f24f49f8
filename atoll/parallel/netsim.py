"""Network simulator: a communication schedule plus the compute time of one
step in, wall-clock time and compute utilization out.

Model. Islands are symmetric, so one island is simulated: one compute stream
and one outgoing link. Compute runs steps of `step_time_s` back to back; a
step is split into segments at the points where transfers are needed, and a
segment stalls until every transfer it needs has arrived. The link carries
transfers one at a time, FIFO in the order they become ready; a transfer
takes `hops * latency_s + wire_bytes * 8 / bandwidth_bit_s`.

Within a step the forward pass takes the first third and the backward the
remaining two thirds (FORWARD_FRAC = 1/3). Layer l (0 = nearest the input) of
L starts its forward at frac (l/L)/3 and finishes its backward at frac
1/3 + (L-l)/L * 2/3 (the backward walks from layer L-1 down to 0).

Byte conventions (per island; bytes sent = bytes received, which is also how
the trainer counts its traffic):

- ring all-reduce of a payload over M islands: 2(M-1)/M * payload, 2(M-1) hops;
- all-gather of a per-island payload: (M-1) * payload, M-1 hops;
- point-to-point exchange with one partner: payload, 1 hop.

Schedule builders describe a model by `layers` (L), `params_per_layer` and
`bytes_per_param` on the wire (2 for bf16, 4.25/8 for FP4 with one fp32
scale per 128 values), and `islands` (M). H is the number of inner steps
between syncs, `fragments` (P) the number of Streaming-DiLoCo fragments and
`tau` the number of steps a fragment's sync may overlap with compute.

`backward_overlap=True` sends a sync layer by layer, each layer as soon as
its backward is done in the sync step, needed at that layer's forward in the
step that consumes it: DDP-style bucketing, and the convention the Streaming
DiLoCo paper's Table 4 simulation uses for every method. With False a sync
is one transfer ready at the end of the step and needed at the forward of the
earliest layer it carries (frac 0 for a whole-model sync).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

from atoll.core import outer

FORWARD_FRAC = 1.0 / 3.0
BF16_BYTES_PER_PARAM = 2.0
FP4_BYTES_PER_PARAM = 4.25 / 8.0  # 4-bit values + one fp32 scale per 128-value block

# Streaming DiLoCo Table 4 reports the smallest bandwidth on a geometric grid
# that reaches the target; 184.2 and 471.5 Gbit/s are 5 grid steps apart.
PAPER_GRID_ANCHOR_GBIT_S = 184.2
PAPER_GRID_RATIO = (471.5 / 184.2) ** (1.0 / 5.0)  # ~1.207


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Bytes one island sends for one (piece of a) sync.

    Ready after `ready_frac` of step `step`'s compute (1.0 = end of step);
    compute of step `needed_by_step` may run `needed_frac` of the step before
    it must have arrived. `wire_bytes` already includes the collective's
    factor; `hops` counts latency terms.
    """

    step: int
    ready_frac: float
    wire_bytes: float
    hops: int
    needed_by_step: int
    needed_frac: float = 0.0


@dataclasses.dataclass(frozen=True)
class SimResult:
    wall_s: float
    compute_s: float
    utilization: float
    stall_s: float


# ---------------------------------------------------------------- collectives


def ring_allreduce_bytes(payload_bytes: float, islands: int) -> float:
    """Bytes each island sends in a ring all-reduce: reduce-scatter plus
    all-gather, each moving (M-1)/M of the payload."""
    _check_islands(islands)
    return 2.0 * (islands - 1) / islands * payload_bytes


def allgather_bytes(per_island_payload_bytes: float, islands: int) -> float:
    """Bytes each island sends in an all-gather: its own piece to M-1 peers
    (ring: forwards M-1 pieces)."""
    _check_islands(islands)
    return (islands - 1) * per_island_payload_bytes


def p2p_bytes(payload_bytes: float) -> float:
    return float(payload_bytes)


def ring_allreduce_hops(islands: int) -> int:
    return 2 * (islands - 1)


def allgather_hops(islands: int) -> int:
    return islands - 1


def transfer_seconds(wire_bytes: float, hops: int, bandwidth_bit_s: float, latency_s: float = 0.0) -> float:
    """Time one transfer holds the link."""
    return hops * latency_s + wire_bytes * 8.0 / bandwidth_bit_s


def _check_islands(islands: int) -> None:
    if islands < 1:
        raise ValueError(f"islands must be >= 1, got {islands}")


# ------------------------------------------------------------- layer timing


def layer_ready_frac(layer: int, layers: int) -> float:
    """Fraction of a step after which layer `layer`'s backward is done."""
    return FORWARD_FRAC + (layers - layer) / layers * (1.0 - FORWARD_FRAC)


def layer_needed_frac(layer: int, layers: int) -> float:
    """Fraction of a step before layer `layer`'s forward starts."""
    return layer / layers * FORWARD_FRAC


# ----------------------------------------------------------------- simulate


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Bandwidth-independent part of a simulation: events sorted by position
    (step + frac, readies before needs at a tie)."""

    num_steps: int
    positions: tuple[float, ...]
    is_ready: tuple[bool, ...]
    index: tuple[int, ...]
    wire_bytes: tuple[float, ...]
    hops: tuple[int, ...]
    boundary: tuple[tuple[int, float], ...]  # (transfer, needed_frac) needed in step num_steps


def _prepare(transfers: Sequence[Transfer], num_steps: int) -> _Prepared:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    events: list[tuple[float, int, int]] = []
    boundary: list[tuple[int, float]] = []
    for i, t in enumerate(transfers):
        if not 0.0 <= t.ready_frac <= 1.0 or not 0.0 <= t.needed_frac < 1.0:
            raise ValueError(f"transfer {i}: need 0 <= ready_frac <= 1 and 0 <= needed_frac < 1, got {t}")
        if t.wire_bytes < 0 or t.hops < 0:
            raise ValueError(f"transfer {i}: wire_bytes and hops must be >= 0, got {t}")
        ready_pos = t.step + t.ready_frac
        need_pos = t.needed_by_step + t.needed_frac
        if need_pos < ready_pos:
            raise ValueError(f"transfer {i} is needed (step {t.needed_by_step} + {t.needed_frac}) "
                             f"before it is ready (step {t.step} + {t.ready_frac}): {t}")
        if t.step < 0 or t.step >= num_steps:
            continue  # produced outside the simulated window
        events.append((ready_pos, 0, i))
        if t.needed_by_step < num_steps:
            events.append((need_pos, 1, i))
        elif t.needed_by_step == num_steps:
            boundary.append((i, t.needed_frac))
        # needed later than step num_steps: paid by the next window
    events.sort()
    return _Prepared(
        num_steps=num_steps,
        positions=tuple(e[0] for e in events),
        is_ready=tuple(e[1] == 0 for e in events),
        index=tuple(e[2] for e in events),
        wire_bytes=tuple(t.wire_bytes for t in transfers),
        hops=tuple(t.hops for t in transfers),
        boundary=tuple(boundary),
    )


def _run(prep: _Prepared, step_time_s: float, bandwidth_bit_s: float, latency_s: float) -> SimResult:
    if step_time_s <= 0 or bandwidth_bit_s <= 0 or latency_s < 0:
        raise ValueError(f"need step_time_s > 0, bandwidth_bit_s > 0, latency_s >= 0; got "
                         f"{step_time_s}, {bandwidth_bit_s}, {latency_s}")
    wire, hops = prep.wire_bytes, prep.hops
    done_s: dict[int, float] = {}
    t_s, pos, link_free_s = 0.0, 0.0, 0.0
    for p, ready, i in zip(prep.positions, prep.is_ready, prep.index):
        t_s += (p - pos) * step_time_s
        pos = p
        if ready:
            link_free_s = max(t_s, link_free_s) + transfer_seconds(wire[i], hops[i], bandwidth_bit_s, latency_s)
            done_s[i] = link_free_s
        elif done_s[i] > t_s:
            t_s = done_s[i]
    t_s += (prep.num_steps - pos) * step_time_s
    # Step num_steps is not run, but the stall it would take for transfers
    # produced inside the window is charged to the window, so a sync every H
    # steps over k*H steps costs exactly k stalls.
    wall_s = t_s
    for i, needed_frac in prep.boundary:
        wall_s = max(wall_s, done_s[i] - needed_frac * step_time_s)
    compute_s = prep.num_steps * step_time_s
    return SimResult(wall_s=wall_s, compute_s=compute_s, utilization=compute_s / wall_s,
                     stall_s=wall_s - compute_s)


def simulate(transfers: Sequence[Transfer], num_steps: int, step_time_s: float,
             bandwidth_bit_s: float, latency_s: float = 0.0) -> SimResult:
    """Wall-clock time of `num_steps` steps of compute under `transfers`.

    Transfers produced in steps outside [0, num_steps) are ignored; those
    needed after step num_steps are not waited for, those needed in step
    num_steps are (the window ends when step num_steps could start and run
    without stalling). Utilization = num_steps * step_time_s / wall_s.
    """
    return _run(_prepare(transfers, num_steps), step_time_s, bandwidth_bit_s, latency_s)


def required_bandwidth(transfers: Sequence[Transfer], target_utilization: float, *, num_steps: int,
                       step_time_s: float, latency_s: float = 0.0, lo_bit_s: float = 1e6,
                       hi_bit_s: float = 1e14, rel_tol: float = 1e-3) -> float:
    """Smallest bandwidth (bit/s, within a factor 1+rel_tol) at which
    `transfers` reach `target_utilization`, by bisection on log bandwidth.

    Utilization is non-decreasing in bandwidth (a FIFO link and a compute
    stream that only wait), so bisection is exact up to rel_tol. The returned
    value always reaches the target.
    """
    if not 0.0 < target_utilization <= 1.0:
        raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
    prep = _prepare(transfers, num_steps)

    def reaches(bw: float) -> bool:
        return _run(prep, step_time_s, bw, latency_s).utilization >= target_utilization

    if not reaches(hi_bit_s):
        raise ValueError(f"utilization {target_utilization} is not reached even at {hi_bit_s:.3g} bit/s "
                         "(a transfer needed at the instant it is ready always stalls a little)")
    if reaches(lo_bit_s):
        return lo_bit_s
    lo, hi = math.log(lo_bit_s), math.log(hi_bit_s)
    while hi - lo > math.log1p(rel_tol):
        mid = 0.5 * (lo + hi)
        if reaches(math.exp(mid)):
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def on_paper_grid_gbit_s(gbit_s: float) -> float:
    """Smallest value of Streaming DiLoCo Table 4's geometric grid that is
    >= gbit_s, for reading ours next to the paper's."""
    k = math.ceil(math.log(gbit_s / PAPER_GRID_ANCHOR_GBIT_S) / math.log(PAPER_GRID_RATIO) - 1e-9)
    return PAPER_GRID_ANCHOR_GBIT_S * PAPER_GRID_RATIO ** k


# ----------------------------------------------------------------- schedules


def _layer_sync(step: int, needed_by_step: int, layer_ids: Sequence[int], *, layers: int,
                layer_wire_bytes: float, hops: int, backward_overlap: bool) -> list[Transfer]:
    """One sync of `layer_ids` at the end of `step`, consumed by `needed_by_step`."""
    if backward_overlap:
        # Backward order: the last layer's bytes are ready first.
        return [Transfer(step=step, ready_frac=layer_ready_frac(l, layers), wire_bytes=layer_wire_bytes,
                         hops=hops, needed_by_step=needed_by_step, needed_frac=layer_needed_frac(l, layers))
                for l in sorted(layer_ids, reverse=True)]
    return [Transfer(step=step, ready_frac=1.0, wire_bytes=layer_wire_bytes * len(layer_ids), hops=hops,
                     needed_by_step=needed_by_step, needed_frac=layer_needed_frac(min(layer_ids), layers))]


def ddp_schedule(*, num_steps: int, layers: int, params_per_layer: float, bytes_per_param: float,
                 islands: int) -> list[Transfer]:
    """Data parallel: every step, each layer's gradient bucket is all-reduced
    as soon as its backward is done and is needed by the next step's forward
    of that layer."""
    wire = ring_allreduce_bytes(params_per_layer * bytes_per_param, islands)
    out: list[Transfer] = []
    for s in range(num_steps):
        out += _layer_sync(s, s + 1, range(layers), layers=layers, layer_wire_bytes=wire,
                           hops=ring_allreduce_hops(islands), backward_overlap=True)
    return out


def diloco_schedule(*, num_steps: int, H: int, layers: int, params_per_layer: float, bytes_per_param: float,
                    islands: int, backward_overlap: bool = False) -> list[Transfer]:
    """DiLoCo: after every H inner steps, a blocking ring all-reduce of all
    parameters, needed by the next step."""
    return streaming_schedule(num_steps=num_steps, H=H, fragments=1, layers=layers,
                              params_per_layer=params_per_layer, bytes_per_param=bytes_per_param,
                              islands=islands, tau=0, backward_overlap=backward_overlap)


def fragment_layers(fragment: int, *, fragments: int, layers: int,
                    pattern: Literal["strided", "sequential"] = "strided") -> list[int]:
    """Layers of one fragment, by the trainer's own rule (core/outer.py)."""
    return [l for l in range(layers) if outer.fragment_of_layer(l, layers, fragments, pattern) == fragment]


def streaming_schedule(*, num_steps: int, H: int, fragments: int, layers: int, params_per_layer: float,
                       bytes_per_param: float, islands: int,
                       pattern: Literal["strided", "sequential"] = "strided", tau: int = 0,
                       backward_overlap: bool = False) -> list[Transfer]:
    """Streaming DiLoCo: fragment p is all-reduced at the end of every step s
    with (s + 1 - offset_p) % H == 0, offsets H/P apart. tau = 0 blocks the
    next step (at the forward of the first layer concerned); tau > 0 lets the
    sync overlap tau more steps (needed by step s + 1 + tau)."""
    if not 1 <= fragments <= layers:
        raise ValueError(f"fragments must be in [1, layers={layers}], got {fragments}")
    if H < 1 or tau < 0:
        raise ValueError(f"need H >= 1 and tau >= 0, got H={H}, tau={tau}")
    wire = ring_allreduce_bytes(params_per_layer * bytes_per_param, islands)
    members = [fragment_layers(p, fragments=fragments, layers=layers, pattern=pattern) for p in range(fragments)]
    offsets = outer.fragment_offsets(H, fragments)
    out: list[Transfer] = []
    for s in range(num_steps):
        for p in range(fragments):
            if (s + 1 - offsets[p]) % H == 0:
                out += _layer_sync(s, s + 1 + tau, members[p], layers=layers, layer_wire_bytes=wire,
                                   hops=ring_allreduce_hops(islands), backward_overlap=backward_overlap)
    return out


def noloco_schedule(*, num_steps: int, H: int, layers: int, params_per_layer: float, bytes_per_param: float,
                    tensors: int = 1, backward_overlap: bool = False) -> list[Transfer]:
    """NoLoCo: after every H inner steps, a blocking point-to-point exchange
    of `tensors` full-model tensors with one partner (1 hop, no all-reduce).
    The reference code moves both the outer weights and the delta (tensors=2)."""
    per_layer = p2p_bytes(tensors * params_per_layer * bytes_per_param)
    out: list[Transfer] = []
    for s in range(H - 1, num_steps, H):
        out += _layer_sync(s, s + 1, range(layers), layers=layers, layer_wire_bytes=per_layer, hops=1,
                           backward_overlap=backward_overlap)
    return out


# ------------------------------------------------------- heterogeneous islands


def island_round_seconds(speeds_M: Sequence[float], schedule: "outer.IslandSchedule", *, step_time_s: float,
                         payload_bytes: float, bandwidth_bit_s: float, latency_s: float = 0.0) -> float:
    """Wall-clock of one outer round of islands with different speeds: the
    last island to finish its inner steps (`outer.round_seconds`; an island of
    speed 1 takes step_time_s per step), then a blocking ring all-reduce of
    the fp32 pseudo-gradient (`payload_bytes`) over the M islands. Islands are
    no longer symmetric here, so this is a per-round formula rather than the
    one-island event simulation above."""
    if step_time_s <= 0 or bandwidth_bit_s <= 0 or latency_s < 0:
        raise ValueError(f"need step_time_s > 0, bandwidth_bit_s > 0, latency_s >= 0; got "
                         f"{step_time_s}, {bandwidth_bit_s}, {latency_s}")
    M = len(speeds_M)
    sync_s = transfer_seconds(ring_allreduce_bytes(payload_bytes, M), ring_allreduce_hops(M), bandwidth_bit_s,
                              latency_s) if M > 1 else 0.0
    return outer.round_seconds(speeds_M, schedule, step_time_s) + sync_s
