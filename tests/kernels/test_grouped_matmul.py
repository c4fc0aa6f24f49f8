"""atoll.kernels.grouped_matmul: every backend against the dense masked reference.

The Pallas (Mosaic GPU) kernels run in Pallas' GPU interpreter on the CPU,
eagerly: seconds per kernel even at these sizes, so one small shape family
(200 rows, D = F = 128, five groups, 64-row tiles) serves every interpreted
test and its kernels compile once; group sizes are runtime values, so each test
picks its own. The wgmma forms the interpreter cannot run are checked by
lowering the compiled kernels for CUDA on the CPU, and on a GPU by the
`gpu`-marked tests.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.kernels.grouped_matmul import (
    IMPLEMENTATIONS,
    default_implementation,
    grouped_matmul,
    grouped_matmul_transposed,
)

# The package, not the function `atoll.kernels.grouped_matmul` that atoll.kernels re-exports.
gmm = importlib.import_module("atoll.kernels.grouped_matmul")

M, D, F = 200, 128, 128
# Group 0 spans a tile and a bit, group 1 is empty, group 2 (30 rows) sits inside
# the second tile with groups 0 and 3, group 4 ends inside the third tile; rows
# 190..199 belong to no group, and M is not a tile multiple.
SIZES = (70, 0, 30, 50, 40)


def _small_blocks():
    return gmm.BlockSizes(block_m=64, block_n=128, block_k=64, stages=2)


def _inputs(seed, M, D, F, G, dtype):
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((M, D)), rng.standard_normal((M, F))
    w = rng.standard_normal((G, D, F)) / np.sqrt(D)
    return (jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(dy, dtype))


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def _per_group_numpy(x, w, sizes):
    """y by an explicit loop over groups (numpy, fp64): the contract spelled out."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        y[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return y


def _pallas(x, w, sizes, **kw):
    return gmm.grouped_matmul_pallas(x, w, sizes, block_sizes=kw.pop("bs", _small_blocks()), **kw)


# ------------------------------------------------------------------- reference backends


def test_reference_backends_agree_forward_gradients_and_transposed():
    """xla (ragged_dot) and dense agree with a per-group loop, in value, gradients and
    the transposed form, with uneven and empty groups and unassigned rows."""
    sizes = (13, 0, 40, 7, 0, 25)
    x, w, dy = _inputs(0, 96, 24, 40, len(sizes), jnp.float32)
    s = jnp.asarray(sizes, jnp.int32)
    want = _per_group_numpy(x, w, sizes)
    outs, grads, dws = {}, {}, {}
    for impl in ("xla", "dense"):
        y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, s, implementation=impl), x, w)
        outs[impl], grads[impl] = y, vjp(dy)
        dws[impl] = grouped_matmul_transposed(x, dy, s, implementation=impl)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        assert not np.asarray(y)[sum(sizes):].any()
    for a, b in zip(grads["xla"], grads["dense"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dws["xla"], dws["dense"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dws["dense"], grads["dense"][1], rtol=1e-5, atol=1e-5)
    assert not np.asarray(dws["dense"])[[1, 4]].any()  # empty groups


# --------------------------------------------------------------- pallas, interpreted


def test_pallas_forward_and_gradients_match_references():
    sizes = SIZES
    x, w, dy = _inputs(1, M, D, F, len(SIZES), jnp.bfloat16)
    s = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda x, w: _pallas(x, w, s), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    assert (y.shape, dx.shape, dw.shape) == ((M, F), (M, D), (len(sizes), D, F))
    x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
    want, want_vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, s, implementation="dense"), x32, w32)
    want_dx, want_dw = want_vjp(dy32)
    ragged, ragged_vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, s, implementation="xla"), x, w)
    ragged_dx, ragged_dw = ragged_vjp(dy)
    np.testing.assert_allclose(want, _per_group_numpy(x32, w32, sizes), rtol=1e-4, atol=1e-4)
    # bf16 outputs: a few units in the last place.
    assert _rel_err(y, want) < 1e-2 and _rel_err(y, ragged) < 1e-2
    assert _rel_err(dx, want_dx) < 1e-2 and _rel_err(dx, ragged_dx) < 1e-2
    assert _rel_err(dw, want_dw) < 1e-2 and _rel_err(dw, ragged_dw) < 1e-2
    total = sum(sizes)
    assert not np.asarray(y, np.float32)[total:].any() and not np.asarray(dx, np.float32)[total:].any()
    for g, size in enumerate(sizes):
        if size == 0:
            assert not np.asarray(dw[g], np.float32).any()


def test_pallas_rows_go_to_their_group_at_tile_boundaries():
    """w[g] = (g + 1)·I: every output row is its input row times its group's number, so
    a row computed with a neighbouring group's weights (or left unmasked) shows."""
    x = np.random.default_rng(2).integers(-4, 5, (M, D)).astype(np.float32)
    x[191:] = np.inf  # rows in no group: whatever they hold, their output is 0
    x = jnp.asarray(x, jnp.bfloat16)
    w = jnp.stack([jnp.eye(D, F, dtype=jnp.bfloat16) * (g + 1) for g in range(len(SIZES))])
    # Boundaries at rows 1, 64 (a tile edge), 66 and 191; then all rows in one group.
    for sizes in ((1, 63, 2, 0, 125), (0, 0, 191, 0, 0)):
        # Small integers: exact in bf16, so the comparison is exact.
        y = np.asarray(_pallas(x, w, jnp.asarray(sizes, jnp.int32)), np.float32)
        group_of_row = np.repeat(np.arange(len(sizes)), sizes)
        want = np.zeros((M, F), np.float32)
        want[:len(group_of_row)] = np.asarray(x, np.float32)[:len(group_of_row)] * (group_of_row[:, None] + 1)
        np.testing.assert_array_equal(y, want, err_msg=str(sizes))


def test_pallas_transposed_form_matches_references():
    x, _, dy = _inputs(3, M, D, F, len(SIZES), jnp.bfloat16)
    s = jnp.asarray(SIZES, jnp.int32)
    # Rows in no group may hold anything: masked in both operands, they add nothing.
    garbage = jnp.arange(M)[:, None] >= sum(SIZES)
    dw = gmm.grouped_matmul_transposed_pallas(jnp.where(garbage, jnp.inf, x), jnp.where(garbage, jnp.nan, dy), s,
                                              block_sizes=_small_blocks())
    want = grouped_matmul_transposed(x.astype(jnp.float32), dy.astype(jnp.float32), s, implementation="dense")
    ragged = grouped_matmul_transposed(x, dy, s, implementation="xla")
    assert dw.dtype == jnp.bfloat16 and dw.shape == (len(SIZES), D, F)
    assert _rel_err(dw, want) < 1e-2 and _rel_err(dw, ragged) < 1e-2
    assert not np.asarray(dw[1], np.float32).any()


def test_pallas_fp16_accumulates_and_returns_fp32():
    """preferred_element_type=float32: fp32 accumulation and output, within fp32 rounding of
    the fp64 product of the fp16 inputs (bf16/fp16 accumulation or output would be ~1e-3 off).
    Also the other grid order."""
    x, w, _ = _inputs(4, M, D, F, len(SIZES), jnp.float16)
    s = jnp.asarray(SIZES, jnp.int32)
    y = _pallas(x, w, s, preferred_element_type=jnp.float32,
                bs=gmm.BlockSizes(block_m=64, block_n=128, block_k=64, stages=2, fastest="m"))
    assert y.dtype == jnp.float32
    want = _per_group_numpy(x, w, SIZES)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


# ------------------------------------------------------------------ compiled lowering


@pytest.mark.parametrize("dtype,out,bs", [
    (jnp.bfloat16, None, None),
    (jnp.float16, jnp.float32, "small"),
])
def test_kernels_lower_for_cuda(dtype, out, bs):
    """The compiled path (TMA pipeline, async wgmma with transposed shared-memory operands,
    masked boundary tiles, layouts) lowers to Mosaic GPU: forward, dx and dw kernels."""
    Mc, Dc, Fc, G = 1000, 256, 384, 8
    x = jax.ShapeDtypeStruct((Mc, Dc), dtype)
    w = jax.ShapeDtypeStruct((G, Dc, Fc), dtype)
    sizes = jax.ShapeDtypeStruct((G,), jnp.int32)
    blocks = gmm.BlockSizes(block_m=64, block_n=192, block_k=128, stages=3, fastest="m") if bs else None

    def loss(x, w, sizes):
        y = gmm.grouped_matmul_pallas(x, w, sizes, preferred_element_type=out, block_sizes=blocks,
                                      interpret=False)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))  # uses y, so the forward kernel stays

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w, sizes).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @mosaic_gpu") == 3


# ------------------------------------------------------------------------ visit table


def _brute_force_visits(sizes, M_pad, bm):
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ends = np.cumsum(sizes)
    return [[g for g in range(len(sizes)) if sizes[g] and starts[g] < (t + 1) * bm and ends[g] > t * bm]
            for t in range(M_pad // bm)]


@pytest.mark.parametrize("G,M_pad,bm", [(1, 128, 64), (5, 1024, 128), (64, 1024, 64)])
def test_visit_table_matches_brute_force(G, M_pad, bm):
    """The groups each row tile visits (what decides which rows a tile computes with which
    weights), checked at sizes and group counts the interpreter cannot afford."""
    from atoll.kernels.grouped_matmul import pallas_mgpu

    rng = np.random.default_rng(G)
    batch = []
    for _ in range(16):  # random cuts, empty groups, and rows past the last group
        cuts = np.sort(rng.integers(0, M_pad + 1, G - 1))
        total = int(rng.integers(0, M_pad + 1))
        batch.append(np.diff(np.concatenate([[0], np.minimum(cuts, total), [total]])))
    batch.append(np.full(G, M_pad // G))  # equal groups
    table = jax.vmap(lambda s: pallas_mgpu.visit_table(*pallas_mgpu.group_bounds(s, M_pad), M_pad // bm, bm))
    offsets, groups = (np.asarray(a) for a in table(jnp.asarray(np.stack(batch), jnp.int32)))
    for sizes, offs, grps in zip(batch, offsets, groups):
        got = [list(grps[offs[t]:offs[t + 1]]) for t in range(M_pad // bm)]
        assert got == _brute_force_visits(sizes, M_pad, bm), sizes


# ----------------------------------------------------------------- contract and errors


def test_default_implementation(monkeypatch):
    assert default_implementation(jnp.bfloat16, 128, 128) == "xla"  # no GPU here
    monkeypatch.setattr(gmm, "_on_hopper", lambda: True)
    assert default_implementation(jnp.bfloat16, 1024, 4096) == "xla"  # not yet measured on an H100
    monkeypatch.setattr(gmm, "PALLAS_BY_DEFAULT", True)
    assert default_implementation(jnp.bfloat16, 1024, 4096) == "pallas"
    assert default_implementation(jnp.float16) == "pallas"
    assert default_implementation(jnp.float32, 1024, 4096) == "xla"
    assert default_implementation(jnp.bfloat16, 1000, 4096) == "xla"
    assert set(IMPLEMENTATIONS) == {"xla", "dense", "pallas"}


def test_bad_inputs_are_named():
    x = jnp.zeros((16, 64), jnp.bfloat16)
    w = jnp.zeros((2, 64, 64), jnp.bfloat16)
    sizes = jnp.array([8, 8], jnp.int32)
    with pytest.raises(ValueError, match=r"x \[M, D\] and w \[G, D, F\]"):
        grouped_matmul(x, jnp.zeros((2, 32, 64), jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match="one per group"):
        grouped_matmul(x, w, jnp.array([16], jnp.int32))
    with pytest.raises(ValueError, match="must be integers"):
        grouped_matmul(x, w, jnp.array([8.0, 8.0]))
    with pytest.raises(ValueError, match="'cutlass' is unknown"):
        grouped_matmul(x, w, sizes, implementation="cutlass")
    with pytest.raises(ValueError, match="x \\[M, D\\] and dy \\[M, F\\]"):
        grouped_matmul_transposed(x, jnp.zeros((15, 64), jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), sizes, implementation="pallas")
    with pytest.raises(ValueError, match="one dtype"):
        grouped_matmul(x, w.astype(jnp.float16), sizes, implementation="pallas")
    with pytest.raises(ValueError, match="multiples of 64; got D=64, F=96"):
        grouped_matmul(x, jnp.zeros((2, 64, 96), jnp.bfloat16), sizes, implementation="pallas")
    with pytest.raises(ValueError, match="multiples of 64; got D=32"):
        grouped_matmul_transposed(x[:, :32], x, sizes, implementation="pallas")
    with pytest.raises(ValueError, match="block_k=96 must be a positive multiple of 64"):
        gmm.BlockSizes(block_k=96)
    with pytest.raises(ValueError, match="at least 2"):
        gmm.BlockSizes(stages=1)
    with pytest.raises(ValueError, match="registers"):
        gmm.BlockSizes(block_m=128, block_n=256)
    with pytest.raises(ValueError, match="'m' or 'n'"):
        gmm.BlockSizes(fastest="k")


# ----------------------------------------------------------------------------- GPU


def _zipf_sizes(G, M, seed=0):
    p = 1.0 / np.arange(1, G + 1)
    counts = np.floor(p / p.sum() * M).astype(int)
    counts[0] += M - counts.sum()
    return np.random.default_rng(seed).permutation(counts)


@pytest.mark.gpu
@pytest.mark.parametrize("groups", ["equal", "zipf"])
def test_pallas_matches_reference_on_gpu(groups):
    G, Mg, Dg, Fg = 8, 4096, 1024, 1024
    sizes = np.full(G, Mg // G) if groups == "equal" else _zipf_sizes(G, Mg - 100)  # zipf: 100 rows unassigned
    s = jnp.asarray(sizes, jnp.int32)
    x, w, dy = _inputs(5, Mg, Dg, Fg, G, jnp.bfloat16)
    assert default_implementation(x.dtype, Dg, Fg) == "pallas"

    @jax.jit
    def run(x, w, s, dy):
        y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, s), x, w)
        return (y, *vjp(dy))

    y, dx, dw = run(x, w, s, dy)
    x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
    want, want_vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, s, implementation="dense"), x32, w32)
    want_dx, want_dw = want_vjp(dy32)
    assert _rel_err(y, want) < 1e-2
    assert _rel_err(dx, want_dx) < 1e-2
    assert _rel_err(dw, want_dw) < 1e-2
    ragged, ragged_vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, s, implementation="xla"), x, w)
    assert _rel_err(y, ragged) < 1e-2
    assert all(_rel_err(a, b) < 1e-2 for a, b in zip((dx, dw), ragged_vjp(dy)))
    assert not np.asarray(y, np.float32)[int(sizes.sum()):].any()
    dw_t = jax.jit(lambda x, dy: grouped_matmul_transposed(x, dy, s, implementation="pallas"))(x, dy)
    assert _rel_err(dw_t, want_dw) < 1e-2
