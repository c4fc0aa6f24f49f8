import json
import math

import pytest

from atoll.parallel import netsim
from atoll.parallel.netsim import Transfer


def _blocking_every(H: int, k: int, wire_bytes: float, hops: int = 0) -> list[Transfer]:
    return [Transfer(step=c * H - 1, ready_frac=1.0, wire_bytes=wire_bytes, hops=hops, needed_by_step=c * H)
            for c in range(1, k + 1)]


@pytest.mark.parametrize("latency_s", [0.0, 0.05])
def test_blocking_sync_every_H_steps_costs_exactly_its_transfer_time(latency_s):
    H, k, C, B, W, hops = 10, 3, 2.0, 1e9, 4e9, 2
    res = netsim.simulate(_blocking_every(H, k, B, hops), num_steps=k * H, step_time_s=C, bandwidth_bit_s=W,
                          latency_s=latency_s)
    comm_s = 8 * B / W + hops * latency_s
    assert res.utilization == pytest.approx(H * C / (H * C + comm_s), rel=1e-12)
    assert res.stall_s == pytest.approx(k * comm_s, rel=1e-12)
    assert res.compute_s == k * H * C


def test_diloco_schedule_is_one_ring_allreduce_every_H_steps():
    H, k, C, W, M = 10, 3, 2.0, 4e9, 4
    layers, ppl, bpp = 6, 1e8, 2.0
    sched = netsim.diloco_schedule(num_steps=k * H, H=H, layers=layers, params_per_layer=ppl, bytes_per_param=bpp,
                                   islands=M)
    assert [t.step for t in sched] == [H - 1, 2 * H - 1, 3 * H - 1]
    wire = netsim.ring_allreduce_bytes(layers * ppl * bpp, M)
    assert all(t.wire_bytes == wire and t.hops == 2 * (M - 1) and t.needed_frac == 0.0 for t in sched)
    res = netsim.simulate(sched, k * H, C, W)
    assert res.utilization == pytest.approx(H * C / (H * C + 8 * wire / W), rel=1e-12)


@pytest.mark.parametrize("duration_steps", [0.5, 2.0, 2.75])
def test_tau_delayed_transfer_stalls_only_by_what_does_not_fit(duration_steps):
    C, tau, W = 1.5, 2, 8e9
    B = duration_steps * C * W / 8
    t = Transfer(step=3, ready_frac=1.0, wire_bytes=B, hops=0, needed_by_step=3 + 1 + tau)
    res = netsim.simulate([t], num_steps=10, step_time_s=C, bandwidth_bit_s=W)
    assert res.stall_s == pytest.approx(max(0.0, duration_steps - tau) * C, abs=1e-12)


def test_link_is_fifo_in_ready_order_not_list_order():
    C, W = 1.0, 8.0  # 1 byte/s
    big = Transfer(step=0, ready_frac=0.5, wire_bytes=3.0, hops=0, needed_by_step=3)
    small = Transfer(step=0, ready_frac=0.6, wire_bytes=0.1, hops=0, needed_by_step=1)
    for order in ([big, small], [small, big]):
        res = netsim.simulate(order, num_steps=4, step_time_s=C, bandwidth_bit_s=W)
        # small waits behind big: done at 0.5 + 3 + 0.1 = 3.6, needed at 1.0.
        assert res.stall_s == pytest.approx(2.6)
        assert res.wall_s == pytest.approx(4 * C + 2.6)


def test_a_stall_delays_later_readiness():
    C, W = 1.0, 8.0  # 1 byte/s
    first = Transfer(step=0, ready_frac=1.0, wire_bytes=2.0, hops=0, needed_by_step=1)  # stalls step 1 by 2 s
    second = Transfer(step=1, ready_frac=1.0, wire_bytes=0.5, hops=0, needed_by_step=2)
    res = netsim.simulate([first, second], num_steps=2, step_time_s=C, bandwidth_bit_s=W)
    # step 1 runs 3..4, second done at 4.5; the window ends when step 2 can start.
    assert res.wall_s == pytest.approx(4.5)


def test_ddp_buckets_overlap_the_backward_and_stall_on_the_first_layer():
    # L=4, C=3: buckets ready at 1.5, 2.0, 2.5, 3.0 (layer 3 first), 1 s each on the link,
    # so layer 0 arrives at 5.5 and every step stalls 2.5 s.
    L, C, W = 4, 3.0, 8.0
    sched = netsim.ddp_schedule(num_steps=5, layers=L, params_per_layer=1.0, bytes_per_param=1.0, islands=2)
    assert [t.ready_frac for t in sched[:L]] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0])
    assert [t.needed_frac for t in sched[:L]] == pytest.approx([0.25, 1 / 6, 1 / 12, 0.0])
    res = netsim.simulate(sched, num_steps=5, step_time_s=C, bandwidth_bit_s=W)
    assert res.utilization == pytest.approx(3.0 / 5.5)


def test_byte_factors():
    assert netsim.ring_allreduce_bytes(100.0, 4) == pytest.approx(150.0)
    assert netsim.ring_allreduce_bytes(100.0, 2) == pytest.approx(100.0)
    assert netsim.ring_allreduce_bytes(100.0, 1) == 0.0
    assert netsim.allgather_bytes(10.0, 5) == pytest.approx(40.0)
    assert netsim.p2p_bytes(7) == 7.0
    assert (netsim.ring_allreduce_hops(4), netsim.allgather_hops(4)) == (6, 3)
    with pytest.raises(ValueError, match="islands"):
        netsim.ring_allreduce_bytes(1.0, 0)


@pytest.mark.parametrize("pattern", ["strided", "sequential"])
def test_streaming_syncs_every_layer_once_per_H_with_staggered_fragments(pattern):
    H, P, L, n = 12, 4, 8, 36
    sched = netsim.streaming_schedule(num_steps=n, H=H, fragments=P, layers=L, params_per_layer=1.0,
                                      bytes_per_param=1.0, islands=2, pattern=pattern, tau=1,
                                      backward_overlap=True)
    layer_of = {round(t.needed_frac * 3 * L) for t in sched}
    assert layer_of == set(range(L))
    assert len(sched) == L * (n // H)
    sync_steps = sorted({t.step for t in sched})
    assert [b - a for a, b in zip(sync_steps, sync_steps[1:])] == [H // P] * (len(sync_steps) - 1)
    assert all(t.needed_by_step == t.step + 2 for t in sched)
    frags = [netsim.fragment_layers(p, fragments=P, layers=L, pattern=pattern) for p in range(P)]
    assert sorted(sum(frags, [])) == list(range(L))
    assert frags[0] == ([0, 4] if pattern == "strided" else [0, 1])


def test_needed_before_ready_is_rejected():
    bad = Transfer(step=2, ready_frac=1.0, wire_bytes=1.0, hops=0, needed_by_step=2, needed_frac=0.5)
    with pytest.raises(ValueError, match="before it is ready"):
        netsim.simulate([bad], 4, 1.0, 1e9)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_required_bandwidth_inverts_simulate(target):
    n, C = 120, 0.7
    sched = netsim.streaming_schedule(num_steps=n, H=30, fragments=6, layers=12, params_per_layer=1e8,
                                      bytes_per_param=2.0, islands=3, tau=1, backward_overlap=True)
    bw = netsim.required_bandwidth(sched, target, num_steps=n, step_time_s=C, latency_s=0.01, rel_tol=1e-3)
    assert netsim.simulate(sched, n, C, bw, 0.01).utilization >= target
    assert netsim.simulate(sched, n, C, 0.9 * bw, 0.01).utilization < target


def test_required_bandwidth_matches_the_closed_form():
    H, k, C, B, u = 10, 2, 2.0, 1e9, 0.8
    bw = netsim.required_bandwidth(_blocking_every(H, k, B), u, num_steps=k * H, step_time_s=C, rel_tol=1e-6)
    assert bw == pytest.approx(8 * B / (H * C * (1 / u - 1)), rel=2e-6)
    with pytest.raises(ValueError, match="not reached"):
        netsim.required_bandwidth(_blocking_every(H, k, B), 1.0, num_steps=k * H, step_time_s=C)


def test_paper_grid():
    assert netsim.on_paper_grid_gbit_s(184.2) == pytest.approx(184.2)
    assert netsim.on_paper_grid_gbit_s(185.0) == pytest.approx(222.3, abs=0.05)
    assert netsim.on_paper_grid_gbit_s(400.0) == pytest.approx(471.5, abs=0.05)
    assert netsim.on_paper_grid_gbit_s(5.0) == pytest.approx(5.2, abs=0.05)


def test_bandwidth_reproduction_ci_orders_methods_like_the_paper(tmp_path):
    from atoll.experiments.reproduce import bandwidth

    bandwidth.reproduce("ci", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# Streaming DiLoCo Table 4")
    assert (tmp_path / "bandwidth.png").stat().st_size > 10_000
    rows = results["rows"]  # the schema: the 100B setting only
    assert {r["model"] for r in rows} == {"100B"}
    assert {r["model"] for r in results["all_rows"]} == {"100B", "10B", "1B"}
    assert all({"method", "utilization", "gbit_per_s", "paper_gbit_per_s"} <= set(r) for r in rows)
    assert len(rows) == len(bandwidth.METHODS) * len(bandwidth.UTILIZATIONS)
    got = {(r["method"], r["utilization"]): r["gbit_per_s"] for r in rows}
    for u in bandwidth.UTILIZATIONS:
        g = [got[(m, u)] for m in bandwidth.ORDERED]
        assert g[0] > g[1] >= g[2] > g[3] > g[4], (u, g)
    paper = [r for r in rows if r["paper_gbit_per_s"] is not None]
    assert len(paper) == 25
    assert all(math.isfinite(r["gbit_per_s"]) and 0.1 < r["gbit_per_s"] / r["paper_gbit_per_s"] < 10 for r in paper)
    assert all(r["paper_gbit_per_s"] is None for r in rows if r["method"] == "noloco")
    assert results["checks"]["all_within_10x"] and not results["checks"]["ordering_violations"]["100B"]
