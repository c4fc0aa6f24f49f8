"""Flash attention as Pallas kernels on the Mosaic GPU backend (Hopper).

Three kernels, each a `plgpu.kernel` with warp specialization: compute
warpgroups do the math with wgmma, one producer warpgroup streams blocks with
TMA into a ring of shared-memory slots guarded by barriers.

  forward   grid (q heads, q tiles, batch); each compute warpgroup owns
            `block_q` query rows and sweeps the key blocks with an online
            softmax; the two warpgroups ping-pong through a schedule barrier so
            one runs its softmax while the other's matmuls use the tensor cores
            (FlashAttention-3). Writes out and the log-sum-exp.
  dq        grid (q heads, q tiles, batch); same sweep, recomputes P from the
            saved log-sum-exp, accumulates dQ = dS·K.
  dkv       grid (kv heads, kv tiles, batch); each warpgroup owns `block_kv`
            keys and sweeps every query head of its group and the query blocks
            that can see those keys, accumulating dK = dSᵀ·Q and dV = Pᵀ·dO.
            Grouped-query heads are summed in the kernel, not afterwards.

Causal attention skips the blocks above the diagonal in all three kernels and
masks only the blocks that straddle it. Sequence lengths that are not block
multiples are zero-padded by the wrapper; padded keys are masked, padded
queries are sliced off (and, with a zero cotangent, contribute nothing to dK
and dV). Segment ids (packed sequences) mask every block.

Interpret mode. `interpret=True` runs the same kernels, barriers and TMA copies
through Pallas' GPU interpreter on the CPU. That interpreter (jax 0.10) cannot
yet execute wgmma with a register operand or a transposed shared-memory
operand, nor `run_state` or layout-annotated loads, so `_Ops` swaps exactly
those five leaf operations for their plain-jnp meaning in interpret mode
(`a @ b.T`, `acc + a @ b`, `ref[...]`, `jnp.full`, `iota`). Everything around
them (block ranges, masks, pipelining, barrier protocol, GQA loops, padding)
is the code that runs on the GPU; the wgmma forms themselves are checked by
lowering the kernels for CUDA on the CPU (tests/kernels) and on the GPU by the
`gpu`-marked tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MASKED = -jnp.inf  # rows that have seen no key yet keep m = -inf; `_safe_max` guards the exponent


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. `block_q`/`block_kv` are per compute warpgroup (multiples of 64)."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2  # TMA ring depth for the streamed operand
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    stages_bwd: int = 2
    compute_wgs: int = 2  # compute warpgroups per CTA (the producer is one more)
    schedule_barrier: bool = True  # forward ping-pong between the compute warpgroups

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value <= 0 or value % 64:
                raise ValueError(f"BlockSizes.{name}={value} must be a positive multiple of 64")
        if self.stages < 1 or self.stages_bwd < 1:
            raise ValueError("BlockSizes.stages and stages_bwd must be at least 1")
        if self.compute_wgs not in (1, 2):
            raise ValueError(f"BlockSizes.compute_wgs={self.compute_wgs} must be 1 or 2")


# --------------------------------------------------------------------------- leaf ops


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The five leaf operations whose GPU form the CPU interpreter cannot run."""

    interpret: bool

    def full(self, shape, value, layout):
        x = jnp.full(shape, value, jnp.float32)
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load_vec(self, ref, layout):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def mm_t(self, a_ref, b_ref, shape, after_issue=None):
        """a @ bᵀ of two shared-memory tiles, fp32 [a rows, b rows]. `after_issue` runs
        while the wgmma is in flight, before its result is read."""
        if self.interpret:
            out = jnp.dot(a_ref[...], b_ref[...].T, preferred_element_type=jnp.float32)
            if after_issue is not None:
                after_issue()
            return out

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
            if after_issue is not None:
                after_issue()
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def mm_acc(self, acc, a, b_ref):
        """acc + a @ b with `a` in registers (16-bit) and `b` a shared-memory tile."""
        if self.interpret:
            return acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(body)(plgpu.ACC.init(acc))


_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def _safe_max(m):
    """The running max to subtract: 0 where nothing is visible yet, so exp2(-inf - m) is 0, not NaN."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def _bcast_rows(v, shape):
    return lax.broadcast_in_dim(v, shape, [0])


def _bcast_cols(v, shape):
    return lax.broadcast_in_dim(v, shape, [1])


def _smem_tile(shape, dtype):
    # 128-byte swizzle over 64 16-bit elements: the layout wgmma reads and TMA writes.
    return plgpu.SMEM(
        shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    )


def _compute_registers(W: int) -> int:
    """Registers per thread for a compute warpgroup; the producer keeps 40. The sum over
    (W + 1) warpgroups of 128 threads must fit the SM's 64K registers."""
    return 232 if W == 2 else 240


def _compiler_params():
    return plgpu.CompilerParams(approx_math=True)


# ----------------------------------------------------------------------- block ranges


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on."""

    causal: bool
    has_segments: bool
    kv_len: int  # real key length (<= padded S)
    q_len: int  # real query length (<= padded T)
    scale: float
    group: int  # query heads per kv head


def _q_ranges(q0, block_q, block_kv, n_kv, st: _Static):
    """Key-block ranges a query block [q0, q0+block_q) visits: (n_unmasked, n_total).

    Blocks [0, n_unmasked) need no mask; [n_unmasked, n_total) are masked
    (causal diagonal, padded keys, segments)."""
    if st.causal:
        n_total = jnp.minimum(pl.cdiv(q0 + block_q, block_kv), n_kv)
        # block j is whole below the diagonal when its last key <= the first row
        n_full = jnp.minimum((q0 + 1) // block_kv, n_total)
    else:
        n_total = jnp.int32(n_kv)
        n_full = jnp.int32(n_kv)
    if st.kv_len < n_kv * block_kv:
        n_full = jnp.minimum(n_full, n_kv - 1)
    if st.has_segments:
        n_full = jnp.int32(0)
    return n_full.astype(jnp.int32), n_total.astype(jnp.int32)


def _kv_ranges(kv0, block_q, block_kv, n_q, st: _Static):
    """Query-block ranges that see keys [kv0, kv0+block_kv): (start, first_unmasked).

    Blocks [start, first_unmasked) are masked, [first_unmasked, n_q) are not."""
    if st.causal:
        start = jnp.minimum(kv0 // block_q, n_q)  # keys past the last query (T < S): no block
        first_full = jnp.minimum(pl.cdiv(kv0 + block_kv - 1, block_q), n_q)
    else:
        start = jnp.int32(0)
        first_full = jnp.int32(0)
    if st.has_segments:
        first_full = jnp.int32(n_q)
    return jnp.asarray(start, jnp.int32), jnp.asarray(first_full, jnp.int32)


def _mask_scores(ops, s, rows0, cols0, st: _Static, *, transposed, seg_rows=None, seg_cols=None):
    """Masks a score tile. Untransposed: rows are queries, cols keys; transposed: the reverse."""
    shape = s.shape
    keep = None
    r = ops.iota(shape, 0) + rows0
    c = ops.iota(shape, 1) + cols0
    q_ids, k_ids = (c, r) if transposed else (r, c)
    if st.causal:
        keep = q_ids >= k_ids
    if not transposed and st.kv_len % shape[1]:
        in_range = k_ids < st.kv_len
        keep = in_range if keep is None else keep & in_range
    if st.has_segments:
        same = _bcast_rows(seg_rows, shape) == _bcast_cols(seg_cols, shape)
        keep = same if keep is None else keep & same
    return s if keep is None else jnp.where(keep, s, _MASKED)


# ---------------------------------------------------------------------------- forward


def _forward_call(q, k, v, q_seg, kv_seg, st: _Static, bs: BlockSizes, interpret: bool):
    B, T, N, K = q.shape
    S = k.shape[1]
    W = bs.compute_wgs
    bq, bkv = bs.block_q, bs.block_kv
    n_kv = S // bkv
    stages = max(1, min(bs.stages, n_kv))
    ops = _Ops(interpret)
    dtype = q.dtype
    c = st.scale * _LOG2E
    use_sched = bs.schedule_barrier and W == 2

    def kernel(q_ref, k_ref, v_ref, *rest):
        if st.has_segments:
            qseg_ref, kvseg_ref, o_ref, lse_ref, scratch = rest
        else:
            o_ref, lse_ref, scratch = rest
        (qo_smem, k_smem, v_smem, lse_smem, qseg_smem, kvseg_smem,
         k_bar, v_bar, seg_bar, q_bar, k_free, v_free, sched) = scratch
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        tile = lax.axis_index("q_tiles")
        wg = lax.axis_index("wg")
        # The tile's last warpgroup sees the most key blocks; the producer feeds that many.
        _, n_tile = _q_ranges(tile * (W * bq) + (W - 1) * bq, bq, bkv, n_kv, st)

        def rendezvous():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < W)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(_compute_registers(W), action="increase")
            q0 = tile * (W * bq) + wg * bq
            my_q = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], my_q, q_bar.at[wg])
            seg_q = None
            if st.has_segments:
                plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(q0, bq)], qseg_smem.at[wg], seg_bar.at[stages + wg])
                plgpu.barrier_wait(seg_bar.at[stages + wg])
                seg_q = ops.load_vec(qseg_smem.at[wg], _ROW)
            plgpu.barrier_wait(q_bar.at[wg])
            n_full, n_mine = _q_ranges(q0, bq, bkv, n_kv, st)

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                # Ping-pong: the other warpgroup runs its softmax while this Q·Kᵀ is on the tensor cores.
                s = ops.mm_t(my_q, k_smem.at[slot], (bq, bkv), after_issue=rendezvous if use_sched else None)
                if masked:
                    if st.has_segments:
                        plgpu.barrier_wait(seg_bar.at[slot])
                        seg_k = ops.load_vec(kvseg_smem.at[slot], _COL)
                    else:
                        seg_k = None
                    s = _mask_scores(ops, s, q0, j * bkv, st, transposed=False,
                                     seg_rows=seg_q, seg_cols=seg_k)
                plgpu.barrier_arrive(k_free.at[slot])
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                m_use = _safe_max(m_new)
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s * c - _bcast_rows(m_use, s.shape))
                l = l * alpha + p.sum(axis=1)
                acc = acc * _bcast_rows(alpha, acc.shape)
                if use_sched:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                if use_sched:
                    plgpu.barrier_wait(sched)
                acc = ops.mm_acc(acc, p.astype(dtype), v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def skip(j, _):
                # Blocks the other warpgroup still needs: free their slots, keep the ping-pong in step.
                # Waiting for the data first keeps every barrier phase observed by every thread.
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                if st.has_segments:
                    plgpu.barrier_wait(seg_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                if use_sched:
                    rendezvous()
                    rendezvous()

            carry = (ops.full((bq, K), 0.0, plgpu.Layout.WGMMA),
                     ops.full((bq,), -jnp.inf, _ROW), ops.full((bq,), 0.0, _ROW))
            if use_sched:
                pl.when(wg == 1)(rendezvous)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(n_full, n_mine, functools.partial(step, masked=True), carry)
            lax.fori_loop(n_mine, n_tile, skip, None)
            if use_sched:
                pl.when(wg == 0)(rendezvous)
            acc, m, l = carry
            # A row with no visible key (possible only with segment ids) gives 0 and lse -inf.
            l_use = jnp.where(l == 0.0, 1.0, l)
            my_q[...] = (acc / _bcast_rows(l_use, acc.shape)).astype(dtype)
            lse_smem.at[wg][...] = (m + jnp.log2(l_use)) * _LN2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(q0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == W)
        def _produce():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")
            kv_h = h // st.group

            def load_k(j, slot):
                rows = pl.ds(j * bkv, bkv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_h], k_smem.at[slot], k_bar.at[slot])
                if st.has_segments:
                    plgpu.copy_gmem_to_smem(kvseg_ref.at[b, rows], kvseg_smem.at[slot], seg_bar.at[slot])

            def load_v(j, slot):
                plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(j * bkv, bkv), kv_h], v_smem.at[slot], v_bar.at[slot])

            # K frees before V in a step (after Q·Kᵀ), so its refill starts first.
            _produce_ring([(k_free, load_k), (v_free, load_v)], stages, n_tile)

    def entry(*refs):
        n_in = 5 if st.has_segments else 3
        ins, outs = refs[:n_in], refs[n_in:]
        pl.run_scoped(
            lambda *scratch: kernel(*ins, *outs, scratch),
            _smem_tile((W, bq, K), dtype),
            _smem_tile((stages, bkv, K), dtype),
            _smem_tile((stages, bkv, K), dtype),
            plgpu.SMEM((W, bq), jnp.float32),
            plgpu.SMEM((W, bq), jnp.int32),
            plgpu.SMEM((stages, bkv), jnp.int32),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages + W),
            plgpu.Barrier(num_barriers=W),
            plgpu.Barrier(num_arrivals=W, num_barriers=stages),
            plgpu.Barrier(num_arrivals=W, num_barriers=stages),
            plgpu.Barrier(num_arrivals=W),
            collective_axes="wg",
        )

    args = (q, k, v) + ((q_seg, kv_seg) if st.has_segments else ())
    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
        grid=(N, T // (W * bq), B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=W + 1,
        thread_name="wg",
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(*args)


# --------------------------------------------------------------------------- backward


def _dq_call(q, k, v, do, lse2, delta, q_seg, kv_seg, st: _Static, bs: BlockSizes, interpret: bool):
    """dQ; sweeps key blocks like the forward, recomputing P from the saved log-sum-exp."""
    B, T, N, K = q.shape
    S = k.shape[1]
    W = bs.compute_wgs
    bq, bkv = bs.block_q_bwd, bs.block_kv_bwd
    n_kv = S // bkv
    stages = max(1, min(bs.stages_bwd, n_kv))
    ops = _Ops(interpret)
    dtype = q.dtype
    c = st.scale * _LOG2E

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
        if st.has_segments:
            qseg_ref, kvseg_ref, dq_ref, scratch = rest
        else:
            dq_ref, scratch = rest
        (q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem, kvseg_smem,
         own_bar, k_bar, v_bar, seg_bar, free) = scratch
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        tile, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
        _, n_tile = _q_ranges(tile * (W * bq) + (W - 1) * bq, bq, bkv, n_kv, st)

        @pl.when(wg < W)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(_compute_registers(W), action="increase")
            q0 = tile * (W * bq) + wg * bq
            rows = pl.ds(q0, bq)
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], my_q, own_bar.at[wg * 5 + 0])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], my_do, own_bar.at[wg * 5 + 1])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], own_bar.at[wg * 5 + 2])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[wg], own_bar.at[wg * 5 + 3])
            if st.has_segments:
                plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem.at[wg], own_bar.at[wg * 5 + 4])
            for i in range(5 if st.has_segments else 4):
                plgpu.barrier_wait(own_bar.at[wg * 5 + i])
            lse = ops.load_vec(lse_smem.at[wg], _ROW)
            delta = ops.load_vec(delta_smem.at[wg], _ROW)
            seg_q = ops.load_vec(qseg_smem.at[wg], _ROW) if st.has_segments else None
            n_full, n_mine = _q_ranges(q0, bq, bkv, n_kv, st)

            def step(j, dq, masked):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                s = ops.mm_t(my_q, k_smem.at[slot], (bq, bkv))
                if masked:
                    seg_k = None
                    if st.has_segments:
                        plgpu.barrier_wait(seg_bar.at[slot])
                        seg_k = ops.load_vec(kvseg_smem.at[slot], _COL)
                    s = _mask_scores(ops, s, q0, j * bkv, st, transposed=False,
                                     seg_rows=seg_q, seg_cols=seg_k)
                p = jnp.exp2(s * c - _bcast_rows(lse, s.shape))
                plgpu.barrier_wait(v_bar.at[slot])
                dp = ops.mm_t(my_do, v_smem.at[slot], (bq, bkv))
                ds = p * (dp - _bcast_rows(delta, dp.shape))
                dq = ops.mm_acc(dq, ds.astype(dtype), k_smem.at[slot])
                plgpu.barrier_arrive(free.at[slot])
                return dq

            def skip(j, _):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                if st.has_segments:
                    plgpu.barrier_wait(seg_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(free.at[slot])

            dq = ops.full((bq, K), 0.0, plgpu.Layout.WGMMA)
            dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(n_full, n_mine, functools.partial(step, masked=True), dq)
            lax.fori_loop(n_mine, n_tile, skip, None)
            my_q[...] = (dq * st.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == W)
        def _produce():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")
            kv_h = h // st.group

            def load(j, slot):
                cols = pl.ds(j * bkv, bkv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_h], k_smem.at[slot], k_bar.at[slot])
                if st.has_segments:
                    plgpu.copy_gmem_to_smem(kvseg_ref.at[b, cols], kvseg_smem.at[slot], seg_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_h], v_smem.at[slot], v_bar.at[slot])

            _produce_ring([(free, load)], stages, n_tile)

    def entry(*refs):
        n_in = 8 if st.has_segments else 6
        ins, outs = refs[:n_in], refs[n_in:]
        pl.run_scoped(
            lambda *scratch: kernel(*ins, *outs, scratch),
            _smem_tile((W, bq, K), dtype),
            _smem_tile((W, bq, K), dtype),
            plgpu.SMEM((W, bq), jnp.float32),
            plgpu.SMEM((W, bq), jnp.float32),
            plgpu.SMEM((W, bq), jnp.int32),
            _smem_tile((stages, bkv, K), dtype),
            _smem_tile((stages, bkv, K), dtype),
            plgpu.SMEM((stages, bkv), jnp.int32),
            plgpu.Barrier(num_barriers=W * 5),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=W, num_barriers=stages),
            collective_axes="wg",
        )

    args = (q, k, v, do, lse2, delta) + ((q_seg, kv_seg) if st.has_segments else ())
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(N, T // (W * bq), B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=W + 1,
        thread_name="wg",
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(*args)


def _dkv_call(q, k, v, do, lse2, delta, q_seg, kv_seg, st: _Static, bs: BlockSizes, interpret: bool):
    """dK and dV per kv head: sweeps the query blocks of every query head in the group."""
    B, T, N, K = q.shape
    S, H = k.shape[1], k.shape[2]
    W = bs.compute_wgs
    bq, bkv = bs.block_q_bwd, bs.block_kv_bwd
    n_q = T // bq
    ops = _Ops(interpret)
    dtype = q.dtype
    c = st.scale * _LOG2E
    group = st.group

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
        if st.has_segments:
            qseg_ref, kvseg_ref, dk_ref, dv_ref, scratch = rest
        else:
            dk_ref, dv_ref, scratch = rest
        (k_smem, v_smem, kvseg_smem, q_smem, do_smem, lse_smem, delta_smem, qseg_smem,
         own_bar, q_bar, do_bar, vec_bar, seg_bar, free) = scratch
        stages = q_smem.shape[0]
        b, kv_h = lax.axis_index("batch"), lax.axis_index("heads")
        tile, wg = lax.axis_index("kv_tiles"), lax.axis_index("wg")
        # The tile's first warpgroup (lowest keys) sees the most query blocks.
        start_tile, _ = _kv_ranges(tile * (W * bkv), bq, bkv, n_q, st)
        n_per_head = n_q - start_tile
        n_steps = group * n_per_head

        @pl.when(wg < W)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(_compute_registers(W), action="increase")
            kv0 = tile * (W * bkv) + wg * bkv
            rows = pl.ds(kv0, bkv)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_h], my_k, own_bar.at[wg * 5 + 0])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_h], my_v, own_bar.at[wg * 5 + 1])
            if st.has_segments:
                plgpu.copy_gmem_to_smem(kvseg_ref.at[b, rows], kvseg_smem.at[wg], own_bar.at[wg * 5 + 2])
            for i in range(3 if st.has_segments else 2):
                plgpu.barrier_wait(own_bar.at[wg * 5 + i])
            seg_k = ops.load_vec(kvseg_smem.at[wg], _ROW) if st.has_segments else None
            start, first_full = _kv_ranges(kv0, bq, bkv, n_q, st)

            def step(i, carry, g, masked):
                dk, dv = carry
                slot = lax.rem(g * n_per_head + i - start_tile, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                s_t = ops.mm_t(my_k, q_smem.at[slot], (bkv, bq))
                plgpu.barrier_wait(vec_bar.at[2 * slot])
                lse = ops.load_vec(lse_smem.at[slot], _COL)
                if masked:
                    seg_q = None
                    if st.has_segments:
                        plgpu.barrier_wait(seg_bar.at[slot])
                        seg_q = ops.load_vec(qseg_smem.at[slot], _COL)
                    s_t = _mask_scores(ops, s_t, kv0, i * bq, st, transposed=True,
                                       seg_rows=seg_k, seg_cols=seg_q)
                p_t = jnp.exp2(s_t * c - _bcast_cols(lse, s_t.shape))
                plgpu.barrier_wait(do_bar.at[slot])
                dv = ops.mm_acc(dv, p_t.astype(dtype), do_smem.at[slot])
                dp_t = ops.mm_t(my_v, do_smem.at[slot], (bkv, bq))
                plgpu.barrier_wait(vec_bar.at[2 * slot + 1])
                delta = ops.load_vec(delta_smem.at[slot], _COL)
                ds_t = p_t * (dp_t - _bcast_cols(delta, dp_t.shape))
                dk = ops.mm_acc(dk, ds_t.astype(dtype), q_smem.at[slot])
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            def skip(i, _, g):
                slot = lax.rem(g * n_per_head + i - start_tile, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(vec_bar.at[2 * slot])
                plgpu.barrier_wait(vec_bar.at[2 * slot + 1])
                if st.has_segments:
                    plgpu.barrier_wait(seg_bar.at[slot])
                plgpu.barrier_wait(do_bar.at[slot])
                plgpu.barrier_arrive(free.at[slot])

            def head(g, carry):
                lax.fori_loop(start_tile, start, functools.partial(skip, g=g), None)
                carry = lax.fori_loop(start, first_full, functools.partial(step, g=g, masked=True), carry)
                return lax.fori_loop(first_full, n_q, functools.partial(step, g=g, masked=False), carry)

            zeros = ops.full((bkv, K), 0.0, plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
            my_k[...] = (dk * st.scale).astype(dtype)
            my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_k, dk_ref.at[b, rows, kv_h])
            plgpu.copy_smem_to_gmem(my_v, dv_ref.at[b, rows, kv_h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == W)
        def _produce():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def load(t, slot):
                h = kv_h * group + t // n_per_head
                i = start_tile + lax.rem(t, n_per_head)
                rows = pl.ds(i * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], vec_bar.at[2 * slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], vec_bar.at[2 * slot + 1])
                if st.has_segments:
                    plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem.at[slot], seg_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])

            _produce_ring([(free, load)], stages, n_steps)

    n_steps_max = group * n_q
    stages = max(1, min(bs.stages_bwd, n_steps_max))

    def entry(*refs):
        n_in = 8 if st.has_segments else 6
        ins, outs = refs[:n_in], refs[n_in:]
        pl.run_scoped(
            lambda *scratch: kernel(*ins, *outs, scratch),
            _smem_tile((W, bkv, K), dtype),
            _smem_tile((W, bkv, K), dtype),
            plgpu.SMEM((W, bkv), jnp.int32),
            _smem_tile((stages, bq, K), dtype),
            _smem_tile((stages, bq, K), dtype),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.int32),
            plgpu.Barrier(num_barriers=W * 5),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=2 * stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=W, num_barriers=stages),
            collective_axes="wg",
        )

    kv_out = jax.ShapeDtypeStruct(k.shape, dtype)
    args = (q, k, v, do, lse2, delta) + ((q_seg, kv_seg) if st.has_segments else ())
    return plgpu.kernel(
        entry,
        out_type=(kv_out, kv_out),
        grid=(H, S // (W * bkv), B),
        grid_names=("heads", "kv_tiles", "batch"),
        num_threads=W + 1,
        thread_name="wg",
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(*args)


def _produce_ring(streams, stages: int, n_steps):
    """The producer warpgroup's loop over a ring of `stages` slots.

    `streams` is a sequence of (free barrier, load(step, slot)) pairs: slot j % stages
    of a stream is refilled for step j once the consumers have freed it for step
    j - stages."""
    for j in range(stages):
        for _, load in streams:
            pl.when(j < n_steps)(functools.partial(load, j, j))

    @pl.loop(stages, n_steps)
    def _refill(j):
        slot = lax.rem(j, stages)
        for free, load in streams:
            plgpu.barrier_wait(free.at[slot])
            load(j, slot)

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _drain(j):
        # Observe the last frees too, so no barrier phase goes unwaited.
        for free, _ in streams:
            plgpu.barrier_wait(free.at[lax.rem(j, stages)])


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    # Pallas' GPU interpreter (simulated shared memory, threads and barriers on the CPU);
    # jax 0.10 does not export its parameters publicly yet.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# ---------------------------------------------------------------------------- wrapper


def _pad_to(x, axis, multiple):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _padding(bs: BlockSizes):
    """Multiples the padded query / key lengths must be, for all three kernels."""
    W = bs.compute_wgs
    return math.lcm(W * bs.block_q, W * bs.block_q_bwd), math.lcm(bs.block_kv, W * bs.block_kv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_seg, kv_seg, st, bs, interpret):
    return _forward_call(q, k, v, q_seg, kv_seg, st, bs, interpret)


def _flash_fwd(q, k, v, q_seg, kv_seg, st, bs, interpret):
    out, lse = _forward_call(q, k, v, q_seg, kv_seg, st, bs, interpret)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(st, bs, interpret, res, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cotangents
    # dS = P ∘ (dP − Δ) with Δ = rowsum(dO ∘ O); a cotangent on the log-sum-exp adds P·dlse.
    delta = jnp.einsum("btnk,btnk->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    # Rows that saw no key (lse -inf) get P = 0 everywhere.
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)
    d_out = d_out.astype(q.dtype)
    dq = _dq_call(q, k, v, d_out, lse2, delta, q_seg, kv_seg, st, bs, interpret)
    if interpret:
        # The GPU interpreter keeps global state: two interpreted kernels must not run
        # concurrently, so make the second depend on the first.
        dq, d_out = lax.optimization_barrier((dq, d_out))
    dk, dv = _dkv_call(q, k, v, d_out, lse2, delta, q_seg, kv_seg, st, bs, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_supported(q, k) -> None:
    """Raises a ValueError naming what this backend does not support for these inputs."""
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"pallas attention supports bfloat16 and float16, not {q.dtype}")
    if q.dtype != k.dtype:
        raise ValueError(f"pallas attention needs one dtype for q, k, v; got {q.dtype} and {k.dtype}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"pallas attention supports head_dim 64 and 128, not {q.shape[-1]}")


def attention_pallas(
    q_BTNK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    causal: bool = False,
    segment_ids=None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
    """Flash attention on Hopper (Mosaic GPU); interpret mode on other platforms.

    Same contract as `atoll.kernels.attention.attention`; lse is [B, N, T] fp32
    (natural log) and is differentiable."""
    check_supported(q_BTNK, k_BSHK)
    bs = block_sizes or BlockSizes()
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    B, T, N, K = q_BTNK.shape
    S, H = k_BSHK.shape[1], k_BSHK.shape[2]
    t_mult, s_mult = _padding(bs)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = (tuple(segment_ids) if isinstance(segment_ids, (tuple, list))
                         else (segment_ids, segment_ids))
        if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
            raise ValueError(
                f"segment ids must be [batch, seq] for queries {(B, T)} and keys {(B, S)}; "
                f"got {q_seg.shape} and {kv_seg.shape}"
            )
        q_seg = _pad_to(q_seg.astype(jnp.int32), 1, t_mult)
        kv_seg = _pad_to(kv_seg.astype(jnp.int32), 1, s_mult)
    st = _Static(causal=bool(causal), has_segments=segment_ids is not None, kv_len=S, q_len=T,
                 scale=float(K**-0.5 if sm_scale is None else sm_scale), group=N // H)
    q_p = _pad_to(q_BTNK, 1, t_mult)
    k_p, v_p = _pad_to(k_BSHK, 1, s_mult), _pad_to(v_BSHK, 1, s_mult)
    out, lse = _flash(q_p, k_p, v_p, q_seg, kv_seg, st, bs, interpret)
    out, lse = out[:, :T], lse[:, :, :T]
    return (out, lse) if return_lse else out


def attention_backward_pallas(q_BTNK, k_BSHK, v_BSHK, lse_BNT, d_out_BTNK, delta_BNT, *, causal=False,
                              sm_scale=None, block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """The dQ and dK/dV kernels from saved statistics (see attention_backward_reference).
    Returns gradients in q's dtype."""
    check_supported(q_BTNK, k_BSHK)
    bs = block_sizes or BlockSizes()
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    B, T, N, K = q_BTNK.shape
    S, H = k_BSHK.shape[1], k_BSHK.shape[2]
    t_mult, s_mult = _padding(bs)
    st = _Static(causal=bool(causal), has_segments=False, kv_len=S, q_len=T,
                 scale=float(K**-0.5 if sm_scale is None else sm_scale), group=N // H)
    q, d_out = _pad_to(q_BTNK, 1, t_mult), _pad_to(d_out_BTNK.astype(q_BTNK.dtype), 1, t_mult)
    k, v = _pad_to(k_BSHK, 1, s_mult), _pad_to(v_BSHK, 1, s_mult)
    # Padded query rows have dO = 0 and delta = 0, so their dS and dV terms are 0.
    lse2 = _pad_to(jnp.where(lse_BNT == -jnp.inf, jnp.inf, lse_BNT * _LOG2E), 2, t_mult)
    delta = _pad_to(delta_BNT.astype(jnp.float32), 2, t_mult)
    dq = _dq_call(q, k, v, d_out, lse2, delta, None, None, st, bs, interpret)
    if interpret:
        dq, d_out = lax.optimization_barrier((dq, d_out))
    dk, dv = _dkv_call(q, k, v, d_out, lse2, delta, None, None, st, bs, interpret)
    return dq[:, :T], dk[:, :S], dv[:, :S]
