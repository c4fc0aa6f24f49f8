"""Grouped matmul as Pallas kernels on the Mosaic GPU backend (Hopper).

Two kernels, each one warpgroup per program that streams operand tiles with TMA
into a ring of `stages` shared-memory slots (`plgpu.emit_pipeline`) and
accumulates with asynchronous wgmma in fp32 registers; a slot is released one
step late (`delay_release=1`), so the wgmma of step k overlaps the wait for
step k+1's tiles.

  forward   y_MF = x[rows of g] @ w[g]. A program owns one output tile
            (block_m rows × block_n columns) and sweeps D in block_k steps.
            dx = dy @ w[g]ᵀ is the same kernel with the rhs tile read as
            [block_n, block_k] from w and transposed in shared memory.
  dw        dw[g] = x[rows of g]ᵀ @ dy[rows of g]. A program owns one tile of
            dw[g] (block_m of D × block_n of F) and sweeps the group's rows in
            block_k steps, starting at the block that holds its first row; the
            x tile is the transposed shared-memory lhs.

Group boundaries: masked visits, all inside one program. Row tiles are fixed
(t·block_m), and an output tile that several groups overlap is visited once per
(non-empty) overlapping group, each visit a full sweep over D with w[g] and the
rows of x outside group g zeroed in shared memory before the wgmma. All visits
of a tile feed one accumulator and one flattened pipeline (visit × D step), so
the ring stays full across visits and the tile is stored whole, once, with one
TMA copy. We chose this over tiles that never straddle groups because those
need row-exact partial stores from different programs into the same output
tile (a ladder of TMA descriptors, or masked global stores) and a pre-zeroed
output for rows past sum(group_sizes); here those rows are simply masked in
every visit, and a tile past the end has no visit and stores zeros. The cost is
one extra sweep per group boundary that is not a multiple of block_m (≤ G − 1
sweeps in all, against M / block_m tiles). Interior tiles (one group covers
the whole tile: the bulk) run a plain dense-matmul pipeline, with no mask and
no per-step metadata reads. The visit table (per row tile: its groups) is a few small XLA
ops in the wrapper. dw masks the first and last row block of each group the
same way (both operands, so rows outside the groups may hold anything, inf and
NaN included); an empty group has no steps and stores zeros.

Grid order: `BlockSizes.fastest` picks the tile index that varies fastest
between consecutive programs ("n": programs in flight share a row tile of x and
its group's weights; "m": they share a column block of w). dw keeps the group
slowest so the programs of one group run together.

M need not be a tile multiple: the wrapper zero-pads rows (sliced off again;
the padding is outside the custom VJP). D and F must be multiples of 64 (128-
byte swizzled 16-bit tiles); block sizes shrink to the largest multiple of 64
that divides the dimension they tile.

Interpret mode. `interpret=True` runs the same kernels, pipeline, barriers and
TMA copies through Pallas' GPU interpreter on the CPU, wgmma on untransposed
shared-memory tiles included. That interpreter (jax 0.10) cannot yet run wgmma
with a transposed shared-memory operand, `plgpu.load` with a layout, or
layout-annotated iota, so `_Ops` swaps exactly those three leaf operations when
interpreting: the transposed view becomes a transposed copy into a scratch tile
(then the same wgmma), the load is `ref[...]`, the iota is `lax.broadcasted_iota`.
The compiled forms are checked by lowering the kernels for CUDA on the CPU
(tests/kernels) and on a GPU by the `gpu`-marked tests.
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

_ALIGN = 64  # 128-byte swizzle over 16-bit elements
_SUPPORTED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of every kernel: block_m × block_n is the output tile a program owns,
    block_k the contraction step (D for the forward, F for dx, rows for dw)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    # TMA ring depth. 3 keeps a 128×128×64 program's shared memory (96 KiB) small enough
    # for two programs per SM, so one's prologue and store overlap the other's matmuls.
    stages: int = 3
    fastest: str = "n"  # tile index that varies fastest between consecutive programs: "n" or "m"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value <= 0 or value % _ALIGN:
                raise ValueError(f"BlockSizes.{name}={value} must be a positive multiple of {_ALIGN}")
        if self.block_m * self.block_n > 128 * 192:
            raise ValueError(f"BlockSizes block_m×block_n={self.block_m}×{self.block_n}: the fp32 accumulator "
                             "must fit one warpgroup's registers (at most 128×192 elements)")
        if self.stages < 2:
            raise ValueError(f"BlockSizes.stages={self.stages} must be at least 2 (a slot is released one step late)")
        if self.fastest not in ("m", "n"):
            raise ValueError(f"BlockSizes.fastest={self.fastest!r} must be 'm' or 'n'")


# --------------------------------------------------------------------------- leaf ops


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The three leaf operations whose GPU form the CPU interpreter cannot run."""

    interpret: bool

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def load_tile(self, ref):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

    def transposed(self, ref, scratch):
        """`ref`ᵀ as a wgmma operand: a transposed view on the GPU, a transposed copy
        into `scratch` (allocated by `transpose_scratch`) when interpreting."""
        if not self.interpret:
            return plgpu.transpose_ref(ref, (1, 0))
        scratch[...] = ref[...].T
        return scratch

    def transpose_scratch(self, shape, dtype):
        """The scratch tiles `transposed` needs: none on the GPU."""
        return [plgpu.SMEM(shape, dtype)] if self.interpret else []


def _transforms(dtype):
    swizzle_elems = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(128))


def _smem_tile(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=_transforms(dtype))


def _spec(shape, dtype, index_map):
    return plgpu.BlockSpec(shape, index_map, transforms=_transforms(dtype), delay_release=1)


def _mask_rows(ops: _Ops, tile_ref, row0, lo, hi):
    """Zeroes the rows of a shared-memory tile whose global row row0 + i is outside [lo, hi)."""
    tile = ops.load_tile(tile_ref)
    rows = ops.iota(tile.shape, 0) + row0
    keep = (rows >= lo) & (rows < hi)
    tile_ref[...] = jnp.where(keep, tile, jnp.zeros_like(tile))
    plgpu.commit_smem()  # the wgmma (async proxy) reads what the threads just wrote


def _store_tile(acc, out_ref, rows, cols):
    """Writes an fp32 accumulator tile to out_ref[rows, cols] through shared memory."""

    def body(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[rows, cols])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(body, _smem_tile(acc.shape, out_ref.dtype))


def _grid(n_m: int, n_n: int, fastest: str):
    # Pallas iterates grids row-major: the last axis varies fastest (CUDA's x).
    if fastest == "m":
        return (n_n, n_m), ("n", "m")
    return (n_m, n_n), ("m", "n")


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    # Pallas' GPU interpreter (simulated shared memory, threads and barriers on the CPU);
    # jax 0.10 does not export its parameters publicly yet.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# ------------------------------------------------------------------- group metadata


@functools.partial(jax.jit, static_argnums=1)
def group_bounds(group_sizes_G: jax.Array, M: int):
    """(starts_G, ends_G) int32 row ranges of the groups, clipped to M rows."""
    cumulative = jnp.cumsum(group_sizes_G.astype(jnp.int32))
    return jnp.minimum(cumulative - group_sizes_G.astype(jnp.int32), M), jnp.minimum(cumulative, M)


@functools.partial(jax.jit, static_argnums=(2, 3))
def visit_table(starts_G: jax.Array, ends_G: jax.Array, n_tiles: int, block_m: int):
    """The groups each row tile is visited with, as CSR: (offsets [T+1], groups [T+G]).

    Row tile t's visits are groups[offsets[t]:offsets[t+1]], in group order: the
    non-empty groups with a row in [t·block_m, (t+1)·block_m). A tile overlaps a
    contiguous run of groups and neighbouring tiles share at most one, so there
    are at most T + G − 1 visits."""
    G = starts_G.shape[0]
    r0_T1 = (jnp.arange(n_tiles, dtype=jnp.int32) * block_m)[:, None]
    overlap_TG = (starts_G[None] < r0_T1 + block_m) & (ends_G[None] > r0_T1) & (ends_G > starts_G)[None]
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(overlap_TG.sum(1, dtype=jnp.int32))])
    flat = jnp.nonzero(overlap_TG.reshape(-1), size=n_tiles + G, fill_value=0)[0]
    return offsets.astype(jnp.int32), (flat % G).astype(jnp.int32)


# ------------------------------------------------------------------------- kernels


def _fit(block: int, dim: int) -> int:
    """The largest multiple of 64 that is at most `block` and divides `dim` (a multiple of 64)."""
    for t in range(block, 0, -_ALIGN):
        if dim % t == 0:
            return t
    raise AssertionError((block, dim))


# jit: an eager call (the custom VJP's, or the interpreter's on the CPU) reuses the
# kernel compiled for these shapes instead of tracing and compiling it again.
@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "bs", "interpret"))
def gmm_call(lhs_MK, rhs_GKN, starts_G, ends_G, *, transpose_rhs: bool, out_dtype, bs: BlockSizes,
             interpret: bool):
    """y[rows of g] = lhs[rows of g] @ rhs[g]; rhs is [G, K, N], or [G, N, K] read transposed.

    M must be a multiple of block_m, K and N multiples of 64."""
    M, K = lhs_MK.shape
    G = rhs_GKN.shape[0]
    N = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    bm, bn, bk = bs.block_m, _fit(bs.block_n, N), _fit(bs.block_k, K)
    n_m, n_n, n_k = M // bm, N // bn, K // bk
    ops = _Ops(interpret)
    dtype = lhs_MK.dtype
    offsets_T1, groups_V = visit_table(starts_G, ends_G, n_m, bm)
    # 2-D views: a [block, block] tile of w[g] is a plain 2-D block of the stacked groups.
    rhs_2d = rhs_GKN.reshape(G * rhs_GKN.shape[1], rhs_GKN.shape[2])

    def kernel(offsets_ref, groups_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *scratch):
        t, n = lax.axis_index("m"), lax.axis_index("n")
        row0 = t * bm
        first = offsets_ref[t]
        n_visits = offsets_ref[t + 1] - first

        def group_of(v):
            return groups_ref[first + v]

        g0 = group_of(0)  # in bounds even without visits: the table is padded
        # The bulk: one group covers the whole tile, a plain dense-matmul tile.
        interior = (n_visits == 1) & (starts_ref[g0] <= row0) & (ends_ref[g0] >= row0 + bm)

        def sweep(acc_ref, grid, group_of, masked: bool):
            def step(idx, lhs_smem, rhs_smem):
                if masked:
                    # Boundary tiles: this visit's rows only (rows past sum(group_sizes)
                    # are in no group, so every visit zeroes them).
                    g = group_of(idx[0])
                    _mask_rows(ops, lhs_smem, row0, starts_ref[g], ends_ref[g])
                rhs = ops.transposed(rhs_smem, scratch[0] if scratch else None) if transpose_rhs else rhs_smem
                plgpu.wgmma(acc_ref, lhs_smem, rhs)

            if transpose_rhs:
                rhs_spec = _spec((bn, bk), dtype, lambda v, k: (group_of(v) * n_n + n, k))
            else:
                rhs_spec = _spec((bk, bn), dtype, lambda v, k: (group_of(v) * n_k + k, n))
            lhs_spec = _spec((bm, bk), dtype, lambda v, k: (t, k))
            plgpu.emit_pipeline(step, grid=grid, in_specs=[lhs_spec, rhs_spec],
                                max_concurrent_steps=bs.stages)(lhs_ref, rhs_ref)

        def sweeps(acc_ref):
            pl.when(interior)(lambda: sweep(acc_ref, (1, n_k), lambda v: g0, masked=False))
            pl.when(~interior & (n_visits > 0))(
                lambda: sweep(acc_ref, (n_visits, n_k), group_of, masked=True))
            return acc_ref[...]

        acc = pl.run_scoped(sweeps, plgpu.ACC((bm, bn), jnp.float32))
        _store_tile(acc, out_ref, pl.ds(row0, bm), pl.ds(n * bn, bn))

    def entry(*refs):
        scratch = ops.transpose_scratch((bk, bn), dtype) if transpose_rhs else []
        if not scratch:
            return kernel(*refs)
        pl.run_scoped(lambda *s: kernel(*refs, *s), *scratch)

    grid, names = _grid(n_m, n_n, bs.fastest)
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=grid,
        grid_names=names,
        interpret=_interpret_params(interpret),
    )(offsets_T1, groups_V, starts_G, ends_G, lhs_MK, rhs_2d)


@functools.partial(jax.jit, static_argnames=("out_dtype", "bs", "interpret"))
def tgmm_call(x_MD, dy_MF, starts_G, ends_G, *, out_dtype, bs: BlockSizes, interpret: bool):
    """dw[g] = x[rows of g]ᵀ @ dy[rows of g], [G, D, F]; zero for empty groups.

    M must be a multiple of block_k, D and F multiples of 64."""
    M, D = x_MD.shape
    F = dy_MF.shape[1]
    G = starts_G.shape[0]
    bm, bn, bk = _fit(bs.block_m, D), _fit(bs.block_n, F), bs.block_k
    ops = _Ops(interpret)
    dtype = x_MD.dtype

    def kernel(starts_ref, ends_ref, x_ref, dy_ref, out_ref, *scratch):
        g, i, j = lax.axis_index("g"), lax.axis_index("m"), lax.axis_index("n")
        lo, hi = starts_ref[g], ends_ref[g]
        b0 = lo // bk
        n_steps = jnp.where(hi > lo, pl.cdiv(hi, bk) - b0, 0)

        def step(idx, x_smem, dy_smem, acc_ref):
            r0 = (b0 + idx[0]) * bk
            # The group's first and last row blocks hold rows of its neighbours (or padding,
            # which may hold anything: both operands are masked, since 0 · inf is NaN).
            @pl.when((r0 < lo) | (r0 + bk > hi))
            def _():
                _mask_rows(ops, x_smem, r0, lo, hi)
                _mask_rows(ops, dy_smem, r0, lo, hi)

            plgpu.wgmma(acc_ref, ops.transposed(x_smem, scratch[0] if scratch else None), dy_smem)

        def sweep(acc_ref):
            @pl.when(n_steps > 0)
            def _():
                plgpu.emit_pipeline(
                    lambda idx, a, b: step(idx, a, b, acc_ref),
                    grid=(n_steps,),
                    in_specs=[_spec((bk, bm), dtype, lambda s: (b0 + s, i)),
                              _spec((bk, bn), dtype, lambda s: (b0 + s, j))],
                    max_concurrent_steps=bs.stages,
                )(x_ref, dy_ref)

            return acc_ref[...]

        acc = pl.run_scoped(sweep, plgpu.ACC((bm, bn), jnp.float32))
        _store_tile(acc, out_ref.at[g], pl.ds(i * bm, bm), pl.ds(j * bn, bn))

    def entry(*refs):
        scratch = ops.transpose_scratch((bm, bk), dtype)
        if not scratch:
            return kernel(*refs)
        pl.run_scoped(lambda *s: kernel(*refs, *s), *scratch)

    (a, b), names = _grid(D // bm, F // bn, bs.fastest)
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((G, D, F), out_dtype),
        grid=(G, a, b),
        grid_names=("g", *names),
        interpret=_interpret_params(interpret),
    )(starts_G, ends_G, x_MD, dy_MF)


# --------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(x_MD, w_GDF, group_sizes_G, out_dtype, bs: BlockSizes, interpret: bool):
    starts, ends = group_bounds(group_sizes_G, x_MD.shape[0])
    return gmm_call(x_MD, w_GDF, starts, ends, transpose_rhs=False, out_dtype=out_dtype, bs=bs,
                    interpret=interpret)


def _gmm_fwd(x_MD, w_GDF, group_sizes_G, out_dtype, bs, interpret):
    return _gmm(x_MD, w_GDF, group_sizes_G, out_dtype, bs, interpret), (x_MD, w_GDF, group_sizes_G)


def _gmm_bwd(out_dtype, bs, interpret, res, dy_MF):
    x_MD, w_GDF, group_sizes_G = res
    starts, ends = group_bounds(group_sizes_G, x_MD.shape[0])
    dy_MF = dy_MF.astype(x_MD.dtype)  # the kernels multiply 16-bit operands (fp32 accumulation)
    dx = gmm_call(dy_MF, w_GDF, starts, ends, transpose_rhs=True, out_dtype=x_MD.dtype, bs=bs,
                  interpret=interpret)
    if interpret:
        # The GPU interpreter keeps global state: two interpreted kernels must not run
        # concurrently, so make the second depend on the first.
        dx, dy_MF = lax.optimization_barrier((dx, dy_MF))
    dw = tgmm_call(x_MD, dy_MF, starts, ends, out_dtype=w_GDF.dtype, bs=bs, interpret=interpret)
    return dx, dw, None  # group sizes are integers: no gradient


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ------------------------------------------------------------------------ wrapper


def check_supported(a, b, D: int, F: int) -> None:
    """Raises a ValueError naming what this backend does not support for operands a, b
    of a grouped matmul with inner sizes D and F."""
    if jnp.dtype(a.dtype) not in _SUPPORTED:
        raise ValueError(f"pallas grouped_matmul supports bfloat16 and float16, not {a.dtype}")
    if a.dtype != b.dtype:
        raise ValueError(f"pallas grouped_matmul needs one dtype for both operands; got {a.dtype} and {b.dtype}")
    if D % _ALIGN or F % _ALIGN:
        raise ValueError(f"pallas grouped_matmul needs D and F to be multiples of {_ALIGN}; got D={D}, F={F}")


def supports(dtype, D: int, F: int) -> bool:
    return jnp.dtype(dtype) in _SUPPORTED and D % _ALIGN == 0 and F % _ALIGN == 0


def _pad_rows(a, multiple: int):
    pad = -a.shape[0] % multiple
    return a if not pad else jnp.pad(a, ((0, pad), (0, 0)))


def _resolve_interpret(interpret):
    return jax.default_backend() != "gpu" if interpret is None else interpret


def _out_dtype(x, preferred_element_type):
    return jnp.dtype(x.dtype if preferred_element_type is None else preferred_element_type)


def grouped_matmul_pallas(x_MD, w_GDF, group_sizes_G, *, preferred_element_type=None,
                          block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """y_MF on Hopper (Mosaic GPU), differentiable in x and w; interpret mode elsewhere."""
    check_supported(x_MD, w_GDF, *w_GDF.shape[1:])
    bs = block_sizes or BlockSizes()
    M = x_MD.shape[0]
    # The forward tiles rows by block_m, the dw kernel by block_k.
    x_p = _pad_rows(x_MD, math.lcm(bs.block_m, bs.block_k))
    y = _gmm(x_p, w_GDF, group_sizes_G.astype(jnp.int32), _out_dtype(x_MD, preferred_element_type), bs,
             _resolve_interpret(interpret))
    return y[:M]


def grouped_matmul_transposed_pallas(x_MD, dy_MF, group_sizes_G, *, preferred_element_type=None,
                                     block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """dw_GDF = per-group x[rows of g]ᵀ @ dy[rows of g] (the dw kernel alone; no VJP)."""
    check_supported(x_MD, dy_MF, x_MD.shape[1], dy_MF.shape[1])
    bs = block_sizes or BlockSizes()
    x_p, dy_p = _pad_rows(x_MD, bs.block_k), _pad_rows(dy_MF, bs.block_k)
    starts, ends = group_bounds(group_sizes_G, x_MD.shape[0])
    return tgmm_call(x_p, dy_p, starts, ends, out_dtype=_out_dtype(x_MD, preferred_element_type), bs=bs,
                     interpret=_resolve_interpret(interpret))
