"""Islands: M replicas trained apart on a leading `island` mesh axis, synced rarely.

The state is the ordinary LM train state with a leading island dimension on
every array (sharded over `island`; the inner data/fsdp/tensor shardings
apply to the rest), plus what each island keeps for the outer loop:

    {"step": [],
     "params": [M, ...], "opt_state": [M, ...],          inner (AdamW) state
     "outer": {"params": [M, ...],                       θ_outer as each island holds it
               "opt_state": [per fragment: [M, ...]],    outer optimizer (momentum, ...)
               "pending": [M, ...]   (streaming τ > 0, async DiLoCo: reduced Δ in flight;
                                      CO2: the islands' mean params in flight)
               "ef": [M, ...]        (SparseLoCo error feedback)
               "anchor": [M, ...]    (islands spanning rounds: the θ_outer each started from)
               "edit": EwmaStats [M, M] (EDiT norm statistics)}}

The inner step is the plain train step vmapped over islands (spmd_axis_name
"island"): nothing in it crosses islands. Every byte between islands goes
through the shard_map'd functions below, which call parallel/collectives.py;
the outer math comes from core/outer.py. Which sync runs after which step is
`outer.events_at`, evaluated on the host, so each compiled sync is small and
the schedule position is just the step counter (checkpointed with the state).

Islands of different speeds follow an `outer.IslandSchedule`: a slower island
skips some ticks (its params and optimizer state stay as they were), and the
outer step takes the token-weighted sum of the pseudo-gradients of the
islands that send this round; an island spanning several rounds keeps its
own params and anchor until its period ends. Both masks come from the step
counter on the device, so no host input and no recompilation per round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from atoll.core import compress, outer
from atoll.parallel import collectives, netsim, sharding, train_state
from atoll.parallel.collectives import ISLAND

State = dict[str, Any]


def island_sharding(s: NamedSharding) -> NamedSharding:
    """The same sharding with a leading island dimension."""
    return NamedSharding(s.mesh, P(ISLAND, *s.spec))


def _over_islands(fn: Callable, mesh) -> Callable:
    """fn(per-island tree) -> per-island tree, run manually over `island` only
    (the inner axes stay automatic)."""
    def body(*args):
        out = fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    return jax.shard_map(body, mesh=mesh, in_specs=P(ISLAND), out_specs=P(ISLAND), axis_names={ISLAND})


def ddp_step_bytes(num_params: int, num_islands: int) -> float:
    """The DDP baseline per island and step: a ring all-reduce of fp32 gradients."""
    return netsim.ring_allreduce_bytes(4 * num_params, num_islands)


@dataclasses.dataclass(frozen=True)
class WireBytes:
    """Bytes one island sends and receives in one event."""
    sent: float
    received: float


class IslandTrainer:
    """Builds and runs the island state, inner step and outer syncs for one run."""

    def __init__(self, model: nn.Module, tx: optax.GradientTransformation, spec: outer.OuterSpec,
                 mesh: jax.sharding.Mesh, seq_len: int, schedule: outer.IslandSchedule | None = None):
        self.model, self.tx, self.spec, self.mesh, self.seq_len = model, tx, spec, mesh, seq_len
        self.M = int(dict(zip(mesh.axis_names, mesh.devices.shape))[ISLAND])
        self.schedule = _check_schedule(schedule, spec, self.M)
        self.outer_tx = outer.outer_transform(spec)
        inner = train_state.state_shardings(model, tx, mesh, seq_len)
        self.inner_shardings = inner
        abstract = jax.eval_shape(
            lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"]),
            jax.random.key(0))
        with_path, self.treedef = jax.tree_util.tree_flatten_with_path(abstract)
        self.param_shapes = [x.shape for _, x in with_path]
        self.param_dtypes = [x.dtype for _, x in with_path]
        paths = [jax.tree_util.keystr(k) for k, _ in with_path]
        fragments = spec.fragments if spec.method == "streaming_diloco" else 1
        self.plan = outer.fragment_plan(paths, self.param_shapes, model.cfg.num_layers, fragments, spec.pattern)
        self.param_count = int(sum(np.prod(s) for s in self.param_shapes))
        self.ddp_step_bytes = ddp_step_bytes(self.param_count, self.M)
        self.shardings = self._state_shardings()
        self._sync_cache: dict = {}
        self._first = None
        self.step_fn = self._make_train_step()
        self.wire = self._wire_table()

    # ------------------------------------------------------------------ state

    def _param_leaf_shardings(self) -> list[NamedSharding]:
        return jax.tree.leaves(self.inner_shardings["params"])

    def _outer_opt_shardings(self, abstract_opt):
        leaf_sh = self._param_leaf_shardings()
        out = []
        for frag, state in zip(self.plan, abstract_opt):
            piece_sh = [island_sharding(leaf_sh[p.leaf]) for p in frag]
            non_param = lambda x: NamedSharding(self.mesh, P(ISLAND, *([None] * (len(x.shape) - 1))))
            out.append(optax.tree_utils.tree_map_params(
                self.outer_tx, lambda _, sh: sh, state, piece_sh, transform_non_params=non_param,
                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
        return out

    def _build(self, single: State) -> State:
        """The island state from one ordinary train state: every island starts identical."""
        bcast = lambda x: jnp.broadcast_to(x, (self.M,) + x.shape)
        params = jax.tree.map(bcast, single["params"])
        leaves = jax.tree.leaves(single["params"])
        st = {"step": single["step"], "params": params, "opt_state": jax.tree.map(bcast, single["opt_state"])}
        o = {"params": params,
             "opt_state": [jax.tree.map(bcast, self.outer_tx.init(outer.take_pieces(leaves, f)))
                           for f in self.plan]}
        zeros = jax.tree.map(jnp.zeros_like, params)
        if self.spec.method == "co2":  # parks mean θ; parking φ0 makes the first application a no-op
            o["pending"] = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        elif self.spec.delayed or (self.spec.method == "streaming_diloco" and self.spec.tau > 0):
            o["pending"] = zeros
        if self.spec.method == "sparseloco":
            o["ef"] = jax.tree.map(lambda x: x.astype(jnp.float32), zeros)
        if self.spec.method == "edit":
            o["edit"] = jax.tree.map(bcast, outer.edit_init_stats(self.M))
        if self.schedule is not None and max(self.schedule.rounds_M) > 1:
            o["anchor"] = params
        st["outer"] = o
        return st

    def _state_shardings(self):
        single = jax.eval_shape(lambda r: nn.meta.unbox(train_state._init_boxed(self.model, self.tx, self.seq_len, r)),
                                jax.random.key(0))
        abstract = jax.eval_shape(self._build, single)
        rep = NamedSharding(self.mesh, P())
        isl = lambda x: NamedSharding(self.mesh, P(ISLAND, *([None] * (len(x.shape) - 1))))
        params_sh = jax.tree.map(island_sharding, self.inner_shardings["params"])
        sh = {"step": rep, "params": params_sh,
              "opt_state": jax.tree.map(island_sharding, self.inner_shardings["opt_state"]),
              "outer": {"params": params_sh, "opt_state": self._outer_opt_shardings(abstract["outer"]["opt_state"])}}
        for key in ("pending", "ef", "anchor"):
            if key in abstract["outer"]:
                sh["outer"][key] = params_sh
        if "edit" in abstract["outer"]:
            sh["outer"]["edit"] = jax.tree.map(isl, abstract["outer"]["edit"])
        self._abstract = abstract
        return sh

    def abstract_state(self):
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self._abstract, self.shardings)

    def init(self, rng: jax.Array) -> State:
        single = train_state.init_state(self.model, self.tx, self.mesh, self.seq_len, rng, self.inner_shardings)
        return self._islands_from(single)

    def _islands_from(self, single: State) -> State:
        build = jax.jit(self._build, out_shardings=self.shardings, donate_argnums=(0,))
        with train_state.mesh_context(self.mesh):
            return build(single)

    def init_from_params(self, params: Any, step: int) -> State:
        """Fresh islands (new inner and outer optimizer states) that all start
        from one replica's `params` (numpy or jax arrays) at `step`: how a run
        continues with a different island count."""
        single = train_state.init_state(self.model, self.tx, self.mesh, self.seq_len, jax.random.key(0),
                                        self.inner_shardings)
        put = lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda idx: np.asarray(x)[idx])
        single = dict(single, params=jax.tree.map(put, params, self.inner_shardings["params"]),
                      step=put(np.int32(step), self.inner_shardings["step"]))
        return self._islands_from(single)

    # ------------------------------------------------------------ inner step

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(ISLAND, sharding.BATCH_AXES, None))

    def _make_train_step(self):
        def inner(params, opt_state, tokens_BT1, active):
            st, metrics = train_state.train_step(
                self.model, self.tx, {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state},
                tokens_BT1)
            if active is not None:  # an island sitting this tick out keeps what it had
                keep = lambda new, old: jnp.where(active, new, old)
                return jax.tree.map(keep, st["params"], params), jax.tree.map(keep, st["opt_state"], opt_state), metrics
            return st["params"], st["opt_state"], metrics

        def step(state: State, tokens_MBT1: jax.Array):
            active_M = None if self.schedule is None else self.schedule.active(state["step"] + 1)
            params, opt_state, metrics = jax.vmap(inner, spmd_axis_name=ISLAND)(
                state["params"], state["opt_state"], tokens_MBT1, active_M)
            new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
            return new, metrics  # per island [M]: averaging them here would be a cross-island collective

        fn = jax.jit(step, in_shardings=(self.shardings, self.batch_sharding()),
                     out_shardings=(self.shardings, NamedSharding(self.mesh, P(ISLAND))), donate_argnums=(0,))
        return _in_island_mesh(fn, self.mesh)

    def put_batch(self, local_RT1: np.ndarray) -> jax.Array:
        """The global batch [M·b, T+1] as [M, b, T+1] (island i gets rows i·b...),
        from this process's R consecutive rows of it (all of it in one process).
        Processes hold whole islands (R a multiple of b) or parts of one (R < b)."""
        R, P = local_RT1.shape[0], jax.process_count()
        b = R * P // self.M
        local = local_RT1.reshape(R // b, b, -1) if R >= b else local_RT1[None]
        return jax.make_array_from_process_local_data(self.batch_sharding(), local, (self.M, b, local.shape[-1]))

    def tokens_at(self, step: int, tokens_per_step: int) -> int:
        """Tokens all islands have trained on after `step` ticks (an island
        taking a tick off does not count its share of the batch)."""
        if self.schedule is None:
            return step * tokens_per_step
        return int(np.sum(self.schedule.steps_done(step))) * tokens_per_step // self.M

    # ------------------------------------------------------------ outer syncs

    def after_step(self, state: State, step: int) -> tuple[State, dict, WireBytes]:
        """Runs the outer events due after inner step `step`; returns the state,
        sync metrics and the bytes this island moved."""
        metrics, sent, received = {}, 0.0, 0.0
        for ev in outer.events_at(step, self.spec):
            key = (ev.kind, ev.fragment)
            if self.spec.method == "noloco":
                partners = outer.noloco_partners(self.M, self.spec.seed, step // self.spec.H)
                key = key + (partners,)
            fn = self._sync_cache.get(key)
            if fn is None:
                fn = self._sync_cache[key] = self._make_sync(*key)
            state, m = fn(state)
            metrics.update({k: v[0] for k, v in collectives.to_host(m).items()})
            w = self.wire[key[:2]]
            sent, received = sent + w.sent, received + w.received
        return state, metrics, WireBytes(sent, received)

    def _make_sync(self, kind: str, frag_index: int, partners: tuple[int, ...] | None = None):
        s, frag, M = self.spec, self.plan[frag_index], self.M
        leaves_of = lambda tree: jax.tree.leaves(tree)
        tdef = self.treedef
        alpha = s.alpha

        def pieces(tree):
            return outer.take_pieces(leaves_of(tree), frag, axis=1)

        def put(tree, values):
            return jax.tree.unflatten(tdef, outer.put_pieces(leaves_of(tree), frag, values, axis=1))

        def outer_apply(delta_bar, ostate, phi):
            upd, ostate = self.outer_tx.update(delta_bar, ostate, phi)
            return optax.apply_updates(phi, upd), ostate

        def finish(state, new_phi, new_ostate, sending_M=None):
            theta = pieces(state["params"])
            mixed = [alpha * t + (1 - alpha) * p if alpha else p for t, p in zip(theta, new_phi)]
            o = dict(state["outer"], params=put(state["outer"]["params"], new_phi))
            if sending_M is not None:  # islands that did not send this round train on from where they are
                mixed = [_where_M(sending_M, m, t) for m, t in zip(mixed, theta)]
                if "anchor" in o:
                    o["anchor"] = put(o["anchor"], [_where_M(sending_M, p, a)
                                                    for p, a in zip(new_phi, pieces(o["anchor"]))])
            o["opt_state"] = list(o["opt_state"])
            o["opt_state"][frag_index] = new_ostate
            return dict(state, params=put(state["params"], mixed), outer=o)

        reduce = self._reduce_fn()

        def apply(state: State, delta_bar, sending_M=None):
            phi = pieces(state["outer"]["params"])
            ostate = state["outer"]["opt_state"][frag_index]
            new_phi, new_ostate = jax.vmap(outer_apply)(delta_bar, ostate, [p.astype(jnp.float32) for p in phi])
            return finish(state, [n.astype(p.dtype) for n, p in zip(new_phi, phi)], new_ostate, sending_M)

        def sync(state: State):
            if kind == "apply":  # streaming, τ > 0: the reduced Δ arrived τ steps after its send
                return apply(state, pieces(state["outer"]["pending"])), {}
            if self.schedule is not None:
                return weighted(state)
            phi, theta = pieces(state["outer"]["params"]), pieces(state["params"])
            delta = [(p - t).astype(jnp.float32) for p, t in zip(phi, theta)]
            ostate = state["outer"]["opt_state"][frag_index]
            metrics = {}
            if s.method == "noloco":
                other = _over_islands(lambda th: collectives.swap(th, partners), self.mesh)(theta)
                g = outer.noloco_pseudo_gradient(phi, [(a + b) / 2 for a, b in zip(theta, other)])
                new_phi, new_ostate = jax.vmap(outer_apply)(g, ostate, phi)
                metrics["outer/delta_norm"] = _norm_M(g)
                return finish(state, new_phi, new_ostate), metrics
            if s.method == "sparseloco":
                ef = pieces(state["outer"]["ef"])
                delta_bar, ef = _over_islands(self._sparse_body, self.mesh)(delta, ef)
                state = dict(state, outer=dict(state["outer"], ef=put(state["outer"]["ef"], ef)))
            elif s.method == "edit":
                delta_bar, stats, w, anom = _over_islands(self._edit_body, self.mesh)(
                    delta, state["outer"]["edit"])
                delta_bar = jax.vmap(lambda d: outer.clip_by_global_norm(d, s.edit_clip))(delta_bar)
                state = dict(state, outer=dict(state["outer"], edit=stats))
                metrics["outer/edit_anomalies"] = jnp.sum(anom, axis=1)
                metrics["outer/edit_max_weight"] = jnp.max(w, axis=1)
            else:
                delta_bar = reduce(delta)
            metrics["outer/delta_norm"] = _norm_M(delta_bar)
            if kind == "send":  # streaming, τ > 0: park it; applied τ steps later
                pend = state["outer"]["pending"]
                return dict(state, outer=dict(state["outer"], pending=put(pend, delta_bar))), metrics
            if s.delayed:  # apply last round's average now, park this round's
                delta_bar, parked = outer.delayed_pseudo_gradient(
                    s.method, phi, pieces(state["outer"]["pending"]), delta_bar)
                state = dict(state, outer=dict(state["outer"], pending=put(state["outer"]["pending"], parked)))
            return apply(state, delta_bar), metrics

        def weighted(state: State):
            """Islands of different speeds: Σ w_i Δ_i over the islands sending
            this round, w ∝ tokens (× staleness discount), Δ_i against the
            outer params island i started its period from."""
            w_M = self.schedule.weights(state["step"])
            start = state["outer"]["anchor"] if "anchor" in state["outer"] else state["outer"]["params"]
            delta = [(a - t).astype(jnp.float32) for a, t in zip(pieces(start), pieces(state["params"]))]
            delta_bar = _over_islands(collectives.weighted_sum, self.mesh)(delta, w_M)
            sending_M = w_M > 0
            metrics = {"outer/delta_norm": _norm_M(delta_bar), "outer/islands_sending": jnp.broadcast_to(
                jnp.sum(sending_M), (M,))}
            return apply(state, delta_bar, sending_M), metrics

        # Metrics stay per island [M] (island 0's is read on the host): pulling
        # one island's value onto every device would itself cross islands.
        fn = jax.jit(sync, in_shardings=(self.shardings,),
                     out_shardings=(self.shardings, NamedSharding(self.mesh, P(ISLAND))), donate_argnums=(0,))
        return _in_island_mesh(fn, self.mesh)

    def _reduce_fn(self):
        """Mean of the pseudo-gradient pieces over islands, `quantization` on the wire."""
        fmt, M = self.spec.quantization, self.M
        if fmt == "fp32":
            return _over_islands(collectives.mean, self.mesh)

        def body(delta):
            flat = jnp.concatenate([d.reshape(-1) for d in delta])
            mean_N = collectives.quantized_mean(flat, fmt, M)
            out, i = [], 0
            for d in delta:
                out.append(mean_N[i:i + d.size].reshape(d.shape))
                i += d.size
            return out

        return _over_islands(body, self.mesh)

    def _sparse_body(self, delta, ef):
        s = self.spec
        means, new_ef = [], []
        for d, e in zip(delta, ef):
            payload, e_new = compress.error_feedback_step(e, d, s.ef_decay, s.topk_chunk, s.topk_k, s.topk_bins)
            everyone = collectives.gather(payload)
            dense_M = jax.vmap(lambda p: compress.topk_decode(p, d.shape, s.topk_chunk, s.topk_k, s.topk_bins))(everyone)
            means.append(jnp.mean(dense_M, axis=0))
            new_ef.append(e_new)
        return means, new_ef

    def _edit_body(self, delta, stats):
        s = self.spec
        norms_M = collectives.gather(optax.tree.norm(delta))
        w_M, anomalous_M, stats = outer.edit_weights(
            norms_M, outer.EwmaStats(*stats), ewma_alpha=s.edit_ewma_alpha, warmup=s.edit_warmup,
            z_threshold=s.edit_z_threshold, temperature=s.edit_temperature)
        mine = w_M[collectives.island_index()]
        summed = jax.tree.map(lambda d: jax.lax.psum(mine * d, ISLAND), delta)
        return summed, outer.EwmaStats(*stats), w_M, anomalous_M

    # ---------------------------------------------------------- accounting

    def _piece_structs(self, frag) -> list[jax.ShapeDtypeStruct]:
        out = []
        for p in frag:
            shape = self.param_shapes[p.leaf]
            if p.layers is not None:
                shape = (len(p.layers),) + tuple(shape[1:])
            out.append(jax.ShapeDtypeStruct(shape, jnp.float32))
        return out

    def _wire_table(self) -> dict[tuple[str, int], WireBytes]:
        s, M = self.spec, self.M
        table = {}
        for f, frag in enumerate(self.plan):
            pieces = self._piece_structs(frag)
            n = sum(int(np.prod(x.shape)) for x in pieces)
            if M == 1:
                b = 0.0
            elif s.method == "noloco":
                b = collectives.swap_wire_bytes(pieces)
            elif s.method == "sparseloco":
                payloads = [jax.eval_shape(lambda x: compress.topk_encode(x, s.topk_chunk, s.topk_k, s.topk_bins), x)
                            for x in pieces]
                b = collectives.gather_wire_bytes(payloads, M)
            elif s.method == "edit":
                b = collectives.mean_wire_bytes(pieces, M) + collectives.gather_wire_bytes(
                    jax.ShapeDtypeStruct((), jnp.float32), M)
            else:
                b = collectives.quantized_mean_wire_bytes(n, s.quantization, M)
            wb = WireBytes(b, b)
            for kind in ("sync", "send"):
                table[(kind, f)] = wb
            table[("apply", f)] = WireBytes(0.0, 0.0)
        return table

    def peak_event_bytes(self) -> float:
        return max(w.sent for w in self.wire.values())

    # ---------------------------------------------------------------- eval

    def eval_params(self, state: State):
        """The outer params of island 0: what the run has agreed on (for NoLoCo,
        where islands differ, island 0's view). Streaming DiLoCo's Table 3 found
        the outer params evaluate better than any replica or their average."""
        if self._first is None:
            self._first = jax.jit(lambda t: jax.tree.map(lambda x: x[0], t),
                                  out_shardings=self.inner_shardings["params"])
        return self._first(state["outer"]["params"])


def _where_M(mask_M: jax.Array, a_M: jax.Array, b_M: jax.Array) -> jax.Array:
    """a where the island's mask is set, else b (island dimension first)."""
    return jnp.where(mask_M.reshape((-1,) + (1,) * (a_M.ndim - 1)), a_M, b_M)


def _check_schedule(schedule: outer.IslandSchedule | None, spec: outer.OuterSpec,
                    num_islands: int) -> outer.IslandSchedule | None:
    """The schedule the trainer needs to follow (None when every island takes every step)."""
    if schedule is None or schedule.uniform:
        return None
    if len(schedule.steps_M) != num_islands:
        raise ValueError(f"the island schedule has {len(schedule.steps_M)} islands; the mesh has {num_islands}")
    if spec.method not in ("diloco", "fedavg") or spec.quantization != "fp32" or schedule.H != spec.H:
        raise ValueError(f"islands of different speeds need diloco or fedavg with fp32 on the wire and the "
                         f"schedule's H = the method's H (got {spec.method}, {spec.quantization}, "
                         f"H {schedule.H} vs {spec.H})")
    return schedule


def _norm_M(tree_M) -> jax.Array:
    """Global norm of each island's slice: [M], computed where each island lives."""
    return jax.vmap(optax.tree.norm)(tree_M)


def _in_island_mesh(fn: Callable, mesh) -> Callable:
    def call(*args):
        with train_state.mesh_context(mesh, within_island=True):
            return fn(*args)
    call.jitted = fn
    return call


@dataclasses.dataclass
class CommLedger:
    """Running totals of what one island put on (and took off) the wire, next
    to what DDP would have moved for the same steps. JSON-able for checkpoints."""
    sent: float = 0.0
    received: float = 0.0
    peak_step: float = 0.0
    syncs: int = 0
    ddp: float = 0.0

    def add(self, wire: WireBytes, ddp_step_bytes: float) -> None:
        self.sent += wire.sent
        self.received += wire.received
        self.peak_step = max(self.peak_step, wire.sent)
        self.syncs += int(wire.sent > 0)
        self.ddp += ddp_step_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CommLedger":
        return cls(**(d or {}))
