"""Island training: init, inner step isolation (HLO), outer syncs against hand math."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atoll.configs import lm
from atoll.core import outer
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.parallel import collectives, islands, mesh as mesh_lib, train_state

SEQ = 16


def tiny_model(num_layers=1, scan=False):
    """One unscanned layer unless a test needs more: the island math is the same
    for any params, and every layer adds to each trainer's compile time."""
    c = lm.get_config("tiny")
    c.model.update(d_model=32, num_layers=num_layers, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                   scan_layers=scan)
    return Transformer(TransformerConfig.from_dict(c.model))


def make(method="diloco", mesh=None, model=None, schedule=None, **kw):
    kw = {"H": 2, "lr": 0.7, "momentum": 0.9, **kw}
    mesh = mesh or mesh_lib.make_mesh({"island": 4, "data": 2})
    tr = islands.IslandTrainer(model or tiny_model(), optax.adamw(3e-3), outer.OuterSpec(method=method, **kw),
                               mesh, SEQ, schedule)
    return tr, tr.init(jax.random.key(0))


def batches(tr, n, seed=0, per_island=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (tr.M * per_island, SEQ + 1)).astype(np.int32) for _ in range(n)]


def run(tr, state, bs, start=0, hook=None):
    for i, b in enumerate(bs, start=start + 1):
        state, _ = tr.step_fn(state, tr.put_batch(b))
        if hook:
            hook(i, state)
        state, _, _ = tr.after_step(state, i)
    return state


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_islands_identical_after_init_and_sharded_over_island():
    tr, st = make()
    for leaf in jax.tree.leaves({k: st[k] for k in ("params", "opt_state")}) + jax.tree.leaves(st["outer"]):
        a = np.asarray(leaf)
        if a.ndim:
            assert a.shape[0] == 4
            np.testing.assert_array_equal(a, np.broadcast_to(a[:1], a.shape))
    for leaf in jax.tree.leaves(st["params"]):
        assert leaf.sharding.spec[0] == "island"


def test_islands_diverge_between_syncs_and_fedavg_equals_mean():
    tr, st = make("fedavg", H=3)
    seen = {}

    def before_sync(i, s):
        if i == 3:
            seen["mean"] = jax.tree.map(lambda x: np.asarray(x).mean(0), host(s["params"]))
            seen["spread"] = max(float(np.ptp(np.asarray(x), axis=0).max()) for x in jax.tree.leaves(host(s["params"])))

    st = run(tr, st, batches(tr, 3), hook=before_sync)
    assert seen["spread"] > 1e-4  # islands trained on different data, apart
    got = host(st["outer"]["params"])
    for g, m in zip(jax.tree.leaves(got), jax.tree.leaves(seen["mean"])):
        np.testing.assert_allclose(g, np.broadcast_to(m, g.shape), rtol=1e-5, atol=1e-6)
    # and the islands restart from the average
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(host(st["params"]))):
        np.testing.assert_array_equal(g, t)


def test_diloco_with_one_island_and_H1_lr1_is_plain_training():
    mesh = mesh_lib.make_mesh({"island": 1, "data": 8})
    model = tiny_model()
    tr, st = make("diloco", mesh=mesh, model=model, H=1, lr=1.0, momentum=0.0)
    bs = batches(tr, 3, per_island=8)
    st = run(tr, st, bs)
    tx = optax.adamw(3e-3)
    plain = train_state.init_state(model, tx, mesh, SEQ, jax.random.key(0))
    step = train_state.make_train_step(model, tx, mesh, SEQ)
    for b in bs:
        plain, _ = step(plain, jax.device_put(b, jax.sharding.NamedSharding(mesh, jax.P(("island", "data")))))
    for a, b in zip(jax.tree.leaves(host(st["outer"]["params"])), jax.tree.leaves(host(plain["params"]))):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)


def test_outer_lr_and_momentum_follow_nesterov_sgd():
    """Two DiLoCo syncs against optax.sgd(nesterov) run by hand on the island means."""
    tr, st = make("diloco", H=2, lr=0.7, momentum=0.9)
    means = []
    st = run(tr, st, batches(tr, 4),
             hook=lambda i, s: means.append(host(s["params"])) if i % 2 == 0 else None)
    phi = jax.tree.map(lambda x: x[0], host(tr.eval_params(st)))  # placeholder for structure
    init = train_state.init_state(tr.model, tr.tx, tr.mesh, SEQ, jax.random.key(0), tr.inner_shardings)
    phi = host(init["params"])
    sgd = optax.sgd(0.7, momentum=0.9, nesterov=True)
    ost = sgd.init(phi)
    for m in means:
        delta = jax.tree.map(lambda p, t: p - t.mean(0), phi, m)
        upd, ost = sgd.update(delta, ost, phi)
        phi = optax.apply_updates(phi, upd)
    for a, b in zip(jax.tree.leaves(host(tr.eval_params(st))), jax.tree.leaves(phi)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_co2_delayed_update_matches_three_rounds_by_hand():
    lr, beta, lam, clip = 1.0, 0.5, 2.0, 2e-3
    tr, st = make("co2", H=2, lr=lr, momentum=beta, gap_penalty=lam, clip=clip)
    phi0 = host(jax.tree.map(lambda x: x[0], st["outer"]["params"]))
    thetas = []
    st = run(tr, st, batches(tr, 6),
             hook=lambda i, s: thetas.append(host(s["params"])) if i % 2 == 0 else None)
    # fairscale-CO2: the mean θ of round k is applied at the end of round k+1,
    # against the outer params of that moment: m = clip(β·m + (φ_now − mean θ_k)/λ).
    # round 1: nothing in flight (g = 0, so m = 0 and φ stays φ0); mean θ(1) parked
    # round 2: g = φ0 − mean θ(1), φ1 = φ0 − lr·m; mean θ(2) (trained from φ0) parked
    # round 3: g = φ1 − mean θ(2), φ2 = φ1 − lr·m
    mean = [jax.tree.map(lambda t: t.mean(0), th) for th in thetas]
    m = jax.tree.map(lambda p, t: np.clip((p - t) / lam, -clip, clip), phi0, mean[0])
    phi1 = jax.tree.map(lambda p, m_: p - lr * m_, phi0, m)
    m = jax.tree.map(lambda m_, p, t: np.clip(beta * m_ + (p - t) / lam, -clip, clip), m, phi1, mean[1])
    phi2 = jax.tree.map(lambda p, m_: p - lr * m_, phi1, m)
    got = host(tr.eval_params(st))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(phi2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(host(st["params"])), jax.tree.leaves(phi2)):  # islands restart from φ2
        np.testing.assert_allclose(a, np.broadcast_to(b, a.shape), rtol=1e-5, atol=1e-6)
    # the clip binds: some momentum entries sit exactly at the bound
    mom = host(st["outer"]["opt_state"][0].momentum)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(mom)) == pytest.approx(clip)
    unclipped = max(float(np.abs((p - t) / lam).max()) for p, t in zip(jax.tree.leaves(phi0), jax.tree.leaves(mean[0])))
    assert unclipped > clip


def test_async_diloco_applies_last_rounds_delta_against_its_own_start():
    """PCCL's async DiLoCo: Δ̄_k = φ_start(k) − mean θ_k, applied as it was one round later."""
    tr, st = make("async_diloco", H=2, lr=0.7, momentum=0.0)
    phi0 = host(jax.tree.map(lambda x: x[0], st["outer"]["params"]))
    thetas = []
    st = run(tr, st, batches(tr, 6),
             hook=lambda i, s: thetas.append(host(s["params"])) if i % 2 == 0 else None)
    mean = [jax.tree.map(lambda t: t.mean(0), th) for th in thetas]
    # round 1: nothing to apply (φ1 = φ0); round 2 (from φ0): apply Δ̄1 = φ0 − mean θ(1);
    # round 3 (from φ1): apply Δ̄2 = φ0 − mean θ(2), the round that also started at φ0
    phi1 = jax.tree.map(lambda p, t: p - 0.7 * (p - t), phi0, mean[0])
    phi2 = jax.tree.map(lambda p1, p0, t: p1 - 0.7 * (p0 - t), phi1, phi0, mean[1])
    for a, b in zip(jax.tree.leaves(host(tr.eval_params(st))), jax.tree.leaves(phi2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_streaming_syncs_every_param_once_per_cycle_with_delay():
    model = tiny_model(num_layers=2)  # one layer per fragment
    tr, st = make("streaming_diloco", model=model, H=4, fragments=2, tau=1, alpha=0.5, lr=0.4,
                  quantization="fp4")
    covered = sorted((p.leaf, l) for f in tr.plan for p in f for l in (p.layers or (None,)))
    assert len(covered) == len(set(covered)) == len(tr.param_shapes)
    events = [(s, e) for s in range(1, 9) for e in outer.events_at(s, tr.spec)]
    sends = [(s, e.fragment) for s, e in events if e.kind == "send"]
    applies = [(s, e.fragment) for s, e in events if e.kind == "apply"]
    assert sends == [(2, 0), (4, 1), (6, 0), (8, 1)]
    assert applies == [(3, 0), (5, 1), (7, 0)]
    st = run(tr, st, batches(tr, 8))
    assert jax.tree.leaves(st["params"])[0].shape[0] == 4


@pytest.mark.parametrize("scan", [False, True])
def test_fragment_plan_covers_every_layer_once(scan):
    model = tiny_model(num_layers=6, scan=scan)
    abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))
    from flax.linen import meta
    flat = jax.tree_util.tree_flatten_with_path(meta.unbox(abstract))[0]
    paths, shapes = [jax.tree_util.keystr(k) for k, _ in flat], [x.shape for _, x in flat]
    for pattern, expect in (("strided", [(0, 3), (1, 4), (2, 5)]), ("sequential", [(0, 1), (2, 3), (4, 5)])):
        plan = outer.fragment_plan(paths, shapes, 6, 3, pattern)
        for f, layers in enumerate(expect):
            got = set()
            for p in plan[f]:
                m = re.search(r"block_(\d+)", paths[p.leaf])
                got |= {int(m.group(1))} if m else set(p.layers or ())
            assert got == set(layers), (pattern, f, got)
        units = [(p.leaf, l) for fr in plan for p in fr for l in (p.layers or (None,))]
        assert len(units) == len(set(units))
        assert {u[0] for u in units} == set(range(len(paths)))


def _collective_groups(hlo: str):
    """(op, groups) for every collective in compiled HLO text, groups as sets of device ids."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(", line)
        if not m:
            continue
        op = m.group(1)
        if op == "collective-permute":
            pairs = re.search(r"source_target_pairs=\{([^}]*)\}", line).group(1)
            out.append((op, [set(map(int, p.split(","))) for p in re.findall(r"\{?(\d+,\d+)\}?", pairs)]))
            continue
        g = re.search(r"replica_groups=(\S+)", line).group(1)
        if g.startswith("{{"):
            groups = [set(map(int, grp.split(","))) for grp in re.findall(r"\{([\d,]+)\}", g)]
        elif g.startswith("["):
            m2 = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", g)
            shape = [int(x) for x in m2.group(1).split(",")]
            ids = np.arange(np.prod([int(x) for x in m2.group(2).split(",")])).reshape(
                [int(x) for x in m2.group(2).split(",")])
            if m2.group(3):
                ids = ids.transpose([int(x) for x in m2.group(3).split(",")])
            groups = [set(row) for row in ids.reshape(shape)]
        elif g.startswith("mesh["):
            dims = re.findall(r"'(\w+)'=(\d+)", line[line.index("mesh["):])
            names = [d[0] for d in dims]
            sizes = [int(d[1]) for d in dims]
            reduced = re.search(r"mesh\[[^\]]*\](?:, device_ids=\(\S+\))?\s*\{([^}]*)\}", line).group(1)
            axes = [names.index(a.strip().strip("'")) for a in reduced.split(",") if a.strip()]
            ids = np.arange(np.prod(sizes))
            perm = re.search(r"device_ids=\(\[([\d,]+)\]T\(([\d,]+)\)\)", line)
            if perm:
                ids = ids.reshape([int(x) for x in perm.group(1).split(",")]).transpose(
                    [int(x) for x in perm.group(2).split(",")])
            ids = ids.reshape(sizes)
            keep = [i for i in range(len(sizes)) if i not in axes]
            ids = ids.transpose(keep + axes).reshape(-1, int(np.prod([sizes[a] for a in axes])))
            groups = [set(row) for row in ids]
        else:
            raise AssertionError(f"unparsed replica groups {g}")
        out.append((op, groups))
    return out


def _crosses_islands(groups, per_island):
    return any(len({d // per_island for d in grp}) > 1 for grp in groups)


def test_inner_step_hlo_has_no_collective_over_island_and_sync_moves_each_tensor_once():
    mesh = mesh_lib.make_mesh({"island": 2, "data": 2, "fsdp": 2})
    assert [d.id for d in mesh.devices.flat] == list(range(8))
    tr, st = make("diloco", mesh=mesh, H=1)
    b = tr.put_batch(batches(tr, 1)[0])
    with train_state.mesh_context(mesh, within_island=True):
        inner_hlo = tr.step_fn.jitted.lower(st, b).compile().as_text()
    inner = _collective_groups(inner_hlo)
    assert inner, "expected intra-island collectives (data/fsdp) in the inner step"
    assert not [op for op, g in inner if _crosses_islands(g, 4)]

    sync = tr._make_sync("sync", 0)
    with train_state.mesh_context(mesh, within_island=True):
        sync_hlo = sync.jitted.lower(st).compile().as_text()
    cross = [line for line in sync_hlo.splitlines() if re.search(r"\ball-reduce(-start)?\(", line)
             and _crosses_islands(_collective_groups(line)[0][1], 4)]
    assert cross
    moved = 0
    for line in cross:
        operands = line.split("=", 1)[1].split("all-reduce")[0]
        moved += sum(int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                     for dims in re.findall(r"f32\[([\d,]*)\]", operands))
    per_device = sum(int(np.prod(leaf.addressable_shards[0].data.shape)) for leaf in jax.tree.leaves(st["params"]))
    assert moved == per_device  # every synced element crosses once, nothing else does


def test_noloco_pairs_islands_and_never_all_reduces():
    for r in range(20):
        p = outer.noloco_partners(8, seed=3, round_index=r)
        assert sorted(p) == list(range(8)) and all(p[p[i]] == i and p[i] != i for i in range(8))
    assert len({outer.noloco_partners(8, 3, r) for r in range(20)}) > 5  # a fresh matching per round
    mesh = mesh_lib.make_mesh({"island": 4, "data": 2})
    tr, st = make("noloco", mesh=mesh, H=1, lr=0.7, momentum=0.5)
    partners = outer.noloco_partners(4, 0, 1)
    sync = tr._make_sync("sync", 0, partners)
    with train_state.mesh_context(mesh, within_island=True):
        hlo = sync.jitted.lower(st).compile().as_text()
    ops = _collective_groups(hlo)
    assert any(op == "collective-permute" for op, _ in ops)
    assert not [op for op, g in ops if op != "collective-permute" and _crosses_islands(g, 2)]
    # the gossip rule: m = η(mean(θ_i, θ_partner) − φ_i) on the first round
    bs = batches(tr, 1)
    st, _ = tr.step_fn(st, tr.put_batch(bs[0]))
    theta, phi = host(st["params"]), host(st["outer"]["params"])
    st, _ = sync(st)
    got = host(st["outer"]["params"])
    for t, f, g in zip(jax.tree.leaves(theta), jax.tree.leaves(phi), jax.tree.leaves(got)):
        expect = f + 0.7 * ((t + t[list(partners)]) / 2 - f)
        np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)


def test_quantized_mean_is_close_and_identical_on_every_island():
    mesh = mesh_lib.make_mesh({"island": 4, "data": 2})
    x = jax.random.normal(jax.random.key(1), (4, 1000))
    for fmt, tol in (("bf16", 1e-2), ("int8", 2e-2), ("fp4", 0.6)):
        f = jax.jit(islands._over_islands(lambda v: collectives.quantized_mean(v, fmt, 4), mesh))
        with train_state.mesh_context(mesh, within_island=True):
            out = np.asarray(f(x))
        np.testing.assert_array_equal(out, np.broadcast_to(out[:1], out.shape))
        err = np.abs(out[0] - np.asarray(x).mean(0)).max()
        assert err < tol * np.abs(np.asarray(x)).max(), (fmt, err)


def test_edit_weights_drop_a_spiking_island():
    stats = outer.edit_init_stats(4)
    for _ in range(10):
        w, anom, stats = outer.edit_weights(jnp.array([1.0, 1.1, 0.9, 1.0]), stats, warmup=5)
        assert not bool(anom.any())
    w, anom, stats2 = outer.edit_weights(jnp.array([1.0, 1.1, 50.0, 1.0]), stats, warmup=5)
    assert list(np.asarray(anom)) == [False, False, True, False]
    assert float(w[2]) == 0.0 and float(w.sum()) == pytest.approx(1.0)
    assert float(w[2 - 1]) < float(w[0])  # larger norm, smaller weight
    assert float(stats2.mean_M[2]) == float(stats.mean_M[2])  # the spike does not pollute the EWMA


def test_wire_bytes_match_payloads():
    tr, _ = make("diloco", H=30)
    n = tr.param_count
    assert tr.wire[("sync", 0)].sent == pytest.approx(2 * 3 / 4 * 4 * n)
    assert tr.ddp_step_bytes == pytest.approx(2 * 3 / 4 * 4 * n)
    model2 = tiny_model(2)
    dense2, _ = make("diloco", model=model2, H=4)
    tr2, _ = make("streaming_diloco", model=model2, H=4, fragments=2, quantization="fp4")
    per_fragment = [tr2.wire[("send", f)].sent for f in range(2)]
    assert sum(per_fragment) < dense2.wire[("sync", 0)].sent * 4.4 / 32  # 4.25 bits instead of 32
    assert max(per_fragment) < 0.6 * sum(per_fragment)  # the peak is one fragment's share
    sp, _ = make("sparseloco", H=30, topk_chunk=256, topk_k=4)
    assert sp.wire[("sync", 0)].sent < tr.wire[("sync", 0)].sent / 30


def test_heterogeneous_schedule_weights_and_round_time_by_hand():
    speeds = [1.0, 1.0, 0.5, 0.25]
    wait = outer.island_schedule(speeds, 30, "wait_for_slowest")
    assert wait.steps_M == (30,) * 4 and wait.uniform
    het = outer.island_schedule(speeds, 30, "heterogeneous")
    assert het.steps_M == (30, 30, 15, 7) and het.rounds_M == (1,) * 4
    # a round: the slowest island's time when everyone waits, the fastest's otherwise
    assert outer.round_seconds(speeds, wait, 0.1) == pytest.approx(12.0)
    assert outer.round_seconds(speeds, het, 0.1) == pytest.approx(3.0)
    # steps are spread over the round: island 2 takes every other tick, all take their share by its end
    assert [bool(het.active(t)[2]) for t in range(1, 7)] == [False, True, False, True, False, True]
    assert list(het.steps_done(30)) == [30, 30, 15, 7] and list(het.steps_done(45)) == [45, 45, 22, 10]
    # weights ∝ tokens (steps × per-island batch): 30, 30, 15, 7 of 82
    np.testing.assert_allclose(het.weights(30), np.array([30, 30, 15, 7]) / 82, rtol=1e-6)
    # an island fitting fewer than min_steps per round spans rounds and sends stale pseudo-gradients:
    # 7.5 steps per round < 8, so 15 steps over 2 rounds, 1 round stale, weight (1 + 1)^-1 · 15
    stale = outer.island_schedule(speeds, 30, "heterogeneous", min_steps=8, staleness_power=1.0)
    assert stale.steps_M == (30, 30, 15, 15) and stale.rounds_M == (1, 1, 1, 2)
    np.testing.assert_allclose(stale.weights(30), np.array([30, 30, 15, 0]) / 75, rtol=1e-6)
    np.testing.assert_allclose(stale.weights(60), np.array([30, 30, 15, 7.5]) / 82.5, rtol=1e-6)
    assert outer.round_seconds(speeds, stale, 0.1) == pytest.approx(3.0)
    assert outer.island_schedule([2.0, 0.01], 10).steps_M == (10, 1)  # 1 step per 20 rounds, not a faked one
    assert outer.island_schedule([2.0, 0.01], 10).rounds_M == (1, 20)
    assert outer.speeds_from_step_seconds([0.2, 0.4, 0.8]) == pytest.approx([1.0, 0.5, 0.25])
    for bad in ([1.0, 0.0], []):
        with pytest.raises(ValueError, match="positive"):
            outer.island_schedule(bad, 30)
    with pytest.raises(ValueError, match="heterogeneity mode"):
        outer.island_schedule(speeds, 30, "fastest")


def test_heterogeneous_islands_weight_their_pseudo_gradients_by_tokens_and_staleness():
    """fedavg (outer lr 1, no momentum): the new outer params are φ − Σ w_i (anchor_i − θ_i), by hand."""
    sched = outer.island_schedule([1, 1, .5, .25], 4, min_steps=2, staleness_power=1.0)
    assert sched.steps_M == (4, 4, 2, 2) and sched.rounds_M == (1, 1, 1, 2)
    tr, st = make("fedavg", H=4, lr=1.0, momentum=0.0, schedule=sched)
    bs, seen = batches(tr, 8), {}
    phi0 = host(st["outer"]["params"])
    st = run(tr, st, bs, hook=lambda i, s: seen.__setitem__(i, (host(s["params"]), host(s["outer"]["params"]))))
    leaves = lambda t: jax.tree.leaves(t)
    # island 2 sits out tick 1 and island 3 ticks 1-3: their params are still φ0 then
    for a, b in zip(leaves(seen[1][0]), leaves(phi0)):
        np.testing.assert_array_equal(a[2:], b[2:])
        assert not np.allclose(a[0], b[0])
    for a, b in zip(leaves(seen[3][0]), leaves(phi0)):
        np.testing.assert_array_equal(a[3], b[3])
    # round 1 (tick 4): islands 0-2 send, weights 4:4:2 of 10; island 3 keeps training
    w1 = np.array([.4, .4, .2, 0.0])
    theta4, _ = seen[4]
    phi1 = jax.tree.map(lambda p, t: p[0] - np.tensordot(w1, p - t, axes=1), phi0, theta4)
    theta5, outer5 = seen[5]
    for got, want in zip(leaves(outer5), leaves(phi1)):
        np.testing.assert_allclose(got[0], want, rtol=2e-5, atol=2e-6)
    # round 2 (tick 8): island 3 sends 2 steps against φ0, one round stale: w ∝ 4, 4, 2, 2/2
    w2 = np.array([4, 4, 2, 1.0]) / 11
    theta8, _ = seen[8]
    anchors = jax.tree.map(lambda p1, p0: np.stack([p1] * 3 + [p0[3]]), phi1, phi0)
    phi2 = jax.tree.map(lambda p, a, t: p - np.tensordot(w2, a - t, axes=1), phi1, anchors, theta8)
    final = host(st["outer"]["params"])
    for got, want in zip(leaves(final), leaves(phi2)):
        np.testing.assert_allclose(got[0], want, rtol=2e-5, atol=2e-6)
    # every island restarts from φ2 after it sent, and tokens count the steps actually taken
    for got, want in zip(leaves(host(st["params"])), leaves(phi2)):
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=2e-5, atol=2e-6)
    assert tr.tokens_at(8, 100) == (8 + 8 + 4 + 2) * 100 // 4