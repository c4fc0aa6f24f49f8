"""Context parallelism: attention over a sequence split along the `context` mesh axis.

All functions here run inside `jax.shard_map` over a mesh with a `context`
axis of C devices; each device holds a contiguous slice of T/C tokens of the
sequence *as laid out*. For causal attention the layout is zig-zag
(`zigzag_positions`): the sequence is cut into 2C chunks and device d holds
chunks d and 2C-1-d, so every device has the same number of visible
(query chunk, key chunk) pairs. The caller permutes tokens into this layout
(and gives the model their real positions); non-causal attention works with
any layout.

Strategies (`context_attention(..., strategy=)`):

  all_gather  gather K and V from every device, attend locally. Autodiff's
              backward reduce-scatters dK and dV.
  ring        K/V travel one hop per step around the ring (ppermute, issued
              before the step's compute so XLA can overlap them) while each
              device keeps its queries; partial results merge by log-sum-exp.
              Custom backward: K/V travel again with their dK/dV accumulators,
              which reach home after one more hop.
  tokenring   TokenRing: K/V stay put, queries travel one way (+1 per step)
              and each partial (out, lse) goes straight back to its query's
              owner (a shift of -s at step s: one hop on a full-mesh switch,
              s hops on a physical ring), so both directions of every link
              carry traffic. Backward: queries, dO and the softmax statistics
              travel, dQ partials return to their owners, dK/dV stay local.

Per (query block, key block) work goes through `atoll.kernels.attention`
(`implementation=` picks xla / cudnn / pallas) with `return_lse=True`, and the
backward through `attention_backward_stats` with the merged statistics. With
the zig-zag layout a ring step off the diagonal is exactly half a block: all
queries against the first key half (keys from an earlier device), or the
second query half against all keys (keys from a later device).

`bytes_per_device` is the communication model; `collective_bytes` counts what
a traced function really sends (the tests hold the two equal).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

from atoll.kernels.attention import attention, attention_backward_stats

STRATEGIES = ("all_gather", "ring", "tokenring")
CONTEXT_AXIS = "context"


# ------------------------------------------------------------------- sequence layout


def check_length(T: int, C: int, causal: bool = True) -> None:
    """The sequence must split evenly: into 2C chunks (causal zig-zag) or C slices."""
    parts = 2 * C if causal else C
    if T % parts:
        raise ValueError(
            f"sequence length {T} must be a multiple of {parts} to split over a context axis of {C} devices"
            + (" (zig-zag: 2 chunks per device)" if causal else ""))


def zigzag_positions(T: int, C: int) -> np.ndarray:
    """[T]: the original position of each token in the zig-zag layout (device d's
    slice holds chunks d and 2C-1-d of the sequence, each T/2C long)."""
    check_length(T, C)
    c = T // (2 * C)
    chunks = [np.r_[d * c:(d + 1) * c, (2 * C - 1 - d) * c:(2 * C - d) * c] for d in range(C)]
    return np.concatenate(chunks)


def visible_chunk_pairs(C: int) -> list[int]:
    """Per device, the (query chunk, key chunk) pairs with at least one visible
    pair of tokens under causal masking in the zig-zag layout: 2C + 1 each."""
    counts = []
    for d in range(C):
        mine = (d, 2 * C - 1 - d)
        counts.append(sum(1 for qc in mine for kc in range(2 * C) if kc <= qc))
    return counts


def scheduled_chunk_pairs(C: int) -> list[int]:
    """Per device, the (query chunk, key chunk) pairs the causal schedule computes:
    over the C key blocks a device meets, 3 on its own block (both diagonals and
    the second query chunk against the first key chunk) and 2 on every other."""
    work = {0: 2, 1: 3, 2: 2}  # by _relation: keys from an earlier device, the same, a later one
    return [sum(work[int(np.sign(j - d)) + 1] for j in range(C)) for d in range(C)]


# ------------------------------------------------------------------- block math


@dataclasses.dataclass(frozen=True)
class _Cfg:
    axis: str
    C: int
    causal: bool
    scale: float | None
    implementation: str | None


def _attend(q, k, v, causal, cfg):
    out, lse = attention(q, k, v, causal=causal, sm_scale=cfg.scale, implementation=cfg.implementation,
                         return_lse=True)
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def _varying_like(x, *refs):
    """x marked as varying over the manual mesh axes the refs vary over (a loop carry
    that starts as a constant must have the type its updates will have)."""
    def varying(a):
        return set(getattr(getattr(jax.typeof(a), "mat", None), "varying", None) or ())

    missing = set().union(*map(varying, refs)) - varying(x)
    return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _empty(q, *refs):
    B, T, N, _ = q.shape
    return (_varying_like(jnp.zeros(q.shape, jnp.float32), q, *refs),
            _varying_like(jnp.full((B, N, T), -jnp.inf, jnp.float32), q, *refs))


def merge(a, b):
    """Log-sum-exp merge of two partial results (out [B,T,N,K], lse [B,N,T]) over disjoint keys."""
    (o_a, l_a), (o_b, l_b) = a, b
    lse = jnp.logaddexp(l_a, l_b)
    safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    w_a = jnp.exp(l_a - safe).transpose(0, 2, 1)[..., None]
    w_b = jnp.exp(l_b - safe).transpose(0, 2, 1)[..., None]
    return o_a * w_a + o_b.astype(jnp.float32) * w_b, lse


def _halves(x, axis=1):
    n = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, n, axis=axis), lax.slice_in_dim(x, n, 2 * n, axis=axis)


def _relation(q_owner, kv_owner):
    """0: keys from an earlier device, 1: the same device, 2: a later one."""
    return jnp.sign(kv_owner - q_owner).astype(jnp.int32) + 1


def block_forward(q, k, v, q_owner, kv_owner, cfg: _Cfg):
    """(out, lse) of local queries against one device's keys, zig-zag causal aware."""
    if not cfg.causal:
        return _attend(q, k, v, False, cfg)
    (q1, q2), (k1, k2), (v1, v2) = _halves(q), _halves(k), _halves(v)

    def earlier():  # every query sees the first key chunk, none the second
        return _attend(q, k1, v1, False, cfg)

    def same():
        o1, l1 = _attend(q1, k1, v1, True, cfg)
        o2, l2 = merge(_attend(q2, k1, v1, False, cfg), _attend(q2, k2, v2, True, cfg))
        return jnp.concatenate([o1, o2], 1), jnp.concatenate([l1, l2], 2)

    def later():  # only the second query chunk sees them, all of them
        o2, l2 = _attend(q2, k, v, False, cfg)
        o1, l1 = _empty(q1)
        return jnp.concatenate([o1, o2], 1), jnp.concatenate([l1, l2], 2)

    return lax.switch(_relation(q_owner, kv_owner), (earlier, same, later))


def _grads(q, k, v, lse, d_out, delta, causal, cfg):
    dq, dk, dv = attention_backward_stats(q, k, v, lse, d_out, delta, causal=causal, sm_scale=cfg.scale,
                                          implementation=cfg.implementation)
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


def block_backward(q, k, v, lse, d_out, delta, q_owner, kv_owner, cfg: _Cfg):
    """This key block's (dq, dk, dv) from the merged statistics (lse, delta), in fp32."""
    if not cfg.causal:
        return _grads(q, k, v, lse, d_out, delta, False, cfg)
    (q1, q2), (k1, k2), (v1, v2) = _halves(q), _halves(k), _halves(v)
    (l1, l2), (do1, do2), (dl1, dl2) = _halves(lse, 2), _halves(d_out), _halves(delta, 2)

    def earlier():
        dq, dk1, dv1 = _grads(q, k1, v1, lse, d_out, delta, False, cfg)
        zk = jnp.zeros(k1.shape, jnp.float32)
        return dq, jnp.concatenate([dk1, zk], 1), jnp.concatenate([dv1, zk], 1)

    def same():
        dq1, dk_a, dv_a = _grads(q1, k1, v1, l1, do1, dl1, True, cfg)
        dq2_a, dk_b, dv_b = _grads(q2, k1, v1, l2, do2, dl2, False, cfg)
        dq2_b, dk2, dv2 = _grads(q2, k2, v2, l2, do2, dl2, True, cfg)
        return (jnp.concatenate([dq1, dq2_a + dq2_b], 1), jnp.concatenate([dk_a + dk_b, dk2], 1),
                jnp.concatenate([dv_a + dv_b, dv2], 1))

    def later():
        dq2, dk, dv = _grads(q2, k, v, l2, do2, dl2, False, cfg)
        return jnp.concatenate([jnp.zeros(q1.shape, jnp.float32), dq2], 1), dk, dv

    return lax.switch(_relation(q_owner, kv_owner), (earlier, same, later))


def _delta(out, lse_ct, d_out):
    delta = jnp.einsum("btnk,btnk->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    return delta if lse_ct is None else delta - lse_ct.astype(jnp.float32)


def _shift(tree, s: int, cfg: _Cfg):
    """Send every leaf s devices along the ring (device i -> i + s mod C)."""
    perm = [(i, (i + s) % cfg.C) for i in range(cfg.C)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis, perm), tree)


# ------------------------------------------------------------------- strategies


def _all_gather(q, k, v, cfg: _Cfg):
    d = lax.axis_index(cfg.axis)
    k_all = lax.all_gather(k, cfg.axis, axis=1, tiled=True)
    v_all = lax.all_gather(v, cfg.axis, axis=1, tiled=True)
    if not cfg.causal:
        out, lse = _attend(q, k_all, v_all, False, cfg)
        return out.astype(q.dtype), lse
    n = k.shape[1]

    def step(acc, j):
        block = [lax.dynamic_slice_in_dim(x, j * n, n, axis=1) for x in (k_all, v_all)]
        return merge(acc, block_forward(q, *block, d, j, cfg)), None

    acc, _ = lax.scan(step, _empty(q, k, v), jnp.arange(cfg.C))
    return acc[0].astype(q.dtype), acc[1]


def _ring_forward(q, k, v, cfg: _Cfg):
    # A loop over the first C-1 steps (each sends its K/V on while it computes) and a
    # last step that sends nothing: one copy of the step in the program, not C.
    d = lax.axis_index(cfg.axis)

    def step(carry, s):
        acc, kv = carry
        nxt = _shift(kv, 1, cfg)  # in flight during this step's compute
        return (merge(acc, block_forward(q, *kv, d, (d - s) % cfg.C, cfg)), nxt), None

    (acc, kv), _ = lax.scan(step, (_empty(q, k, v), (k, v)), jnp.arange(cfg.C - 1))
    out, lse = merge(acc, block_forward(q, *kv, d, (d - (cfg.C - 1)) % cfg.C, cfg))
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring(q, k, v, cfg):
    return _ring_forward(q, k, v, cfg)


def _ring_fwd(q, k, v, cfg):
    out, lse = _ring_forward(q, k, v, cfg)
    return (out, lse), (q, k, v, out, lse)


def _ring_bwd(cfg, res, cts):
    q, k, v, out, lse = res
    d_out, d_lse = cts
    delta = _delta(out, d_lse, d_out)
    d = lax.axis_index(cfg.axis)

    def grads(carry, s):
        dq, kv, dkv = carry
        dq_b, dk_b, dv_b = block_backward(q, *kv, lse, d_out, delta, d, (d - s) % cfg.C, cfg)
        return dq + dq_b, (dkv[0] + dk_b, dkv[1] + dv_b)

    def step(carry, s):
        nxt = _shift(carry[1], 1, cfg)
        dq, dkv = grads(carry, s)
        return (dq, nxt, _shift(dkv, 1, cfg)), None  # the accumulators travel with their K/V

    refs = (q, k, v, d_out, lse)
    zeros = tuple(_varying_like(jnp.zeros(x.shape, jnp.float32), *refs) for x in (q, k, v))
    carry, _ = lax.scan(step, (zeros[0], (k, v), zeros[1:]), jnp.arange(cfg.C - 1))
    dq, dkv = grads(carry, cfg.C - 1)
    if cfg.C > 1:
        dkv = _shift(dkv, 1, cfg)  # after C-1 hops, one more brings them home
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _tokenring_forward(q, k, v, cfg: _Cfg):
    d = lax.axis_index(cfg.axis)
    acc = block_forward(q, k, v, d, d, cfg)
    q_travel = q
    for s in range(1, cfg.C):
        q_travel = _shift(q_travel, 1, cfg)  # now the queries of device d - s
        o, l = block_forward(q_travel, k, v, (d - s) % cfg.C, d, cfg)
        # The partial goes straight back to its queries' owner, in the compute dtype.
        part = _shift((o.astype(q.dtype), l), -s, cfg)
        acc = merge(acc, part)
    return acc[0].astype(q.dtype), acc[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tokenring(q, k, v, cfg):
    return _tokenring_forward(q, k, v, cfg)


def _tokenring_fwd(q, k, v, cfg):
    out, lse = _tokenring_forward(q, k, v, cfg)
    return (out, lse), (q, k, v, out, lse)


def _tokenring_bwd(cfg, res, cts):
    q, k, v, out, lse = res
    d_out, d_lse = cts
    delta = _delta(out, d_lse, d_out)
    d = lax.axis_index(cfg.axis)
    dq, dk, dv = block_backward(q, k, v, lse, d_out, delta, d, d, cfg)
    travel = (q, d_out.astype(q.dtype), lse, delta)
    for s in range(1, cfg.C):
        travel = _shift(travel, 1, cfg)
        dq_b, dk_b, dv_b = block_backward(travel[0], k, v, travel[2], travel[1], travel[3],
                                          (d - s) % cfg.C, d, cfg)
        dk, dv = dk + dk_b, dv + dv_b
        dq = dq + _shift(dq_b, -s, cfg)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_tokenring.defvjp(_tokenring_fwd, _tokenring_bwd)


def context_attention(
    q_BTNK: jax.Array,
    k_BTHK: jax.Array,
    v_BTHK: jax.Array,
    *,
    strategy: str,
    causal: bool = True,
    axis_name: str = CONTEXT_AXIS,
    sm_scale: float | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
):
    """Attention of this device's queries against the whole sequence, inside shard_map.

    q/k/v are the local slices [B, T/C, heads, head_dim] of a sequence in the
    zig-zag layout (causal) or any layout (non-causal). Returns the local
    output slice (and lse [B, N, T/C] in fp32 when `return_lse`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"context strategy {strategy!r} is unknown; choose one of {list(STRATEGIES)}")
    C = lax.psum(1, axis_name)
    check_length(q_BTNK.shape[1] * C, C, causal)
    cfg = _Cfg(axis=axis_name, C=C, causal=causal, scale=sm_scale, implementation=implementation)
    fn = {"all_gather": _all_gather, "ring": _ring, "tokenring": _tokenring}[strategy]
    out, lse = fn(q_BTNK, k_BTHK, v_BTHK, cfg)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------- communication


def bytes_per_device(strategy: str, *, B: int, T: int, N: int, H: int, K: int, C: int,
                     dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one device sends in one attention layer, forward and backward.

    B batch, T the whole sequence (T/C per device), N query heads, H kv heads,
    K head dim; activations in `dtype_bytes`, statistics (lse, delta) and the
    travelling gradient accumulators (dK/dV in ring, dQ in TokenRing) in fp32.
      all_gather  fwd (C-1)·kv; bwd the reduce-scatter of dK, dV: (C-1)·kv
      ring        fwd (C-1)·kv; bwd (C-1)·(kv + fp32 dkv) + fp32 dkv home
      tokenring   fwd (C-1)·(q + out + lse); bwd (C-1)·(q + dO + lse + delta + fp32 dq)
    with kv = 2·B·(T/C)·H·K·dtype_bytes, q = out = dO = B·(T/C)·N·K·dtype_bytes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"context strategy {strategy!r} is unknown; choose one of {list(STRATEGIES)}")
    Tl = T // C
    hops = C - 1
    kv = 2 * B * Tl * H * K * dtype_bytes
    kv32 = 2 * B * Tl * H * K * 4
    q = B * Tl * N * K * dtype_bytes
    stat = B * Tl * N * 4
    if strategy == "all_gather":
        fwd, bwd = hops * kv, hops * kv
    elif strategy == "ring":
        fwd, bwd = hops * kv, hops * (kv + kv32) + (kv32 if C > 1 else 0)
    else:
        fwd, bwd = hops * (2 * q + stat), hops * (2 * q + 2 * stat + B * Tl * N * K * 4)
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def collective_bytes(jaxpr, axis_sizes: dict[str, int]) -> float:
    """Bytes one device sends through ppermute / all_gather / psum_scatter in a jaxpr.

    Nested jaxprs count too: a scan's body once per iteration, a cond's costliest
    branch. all_gather and reduce-scatter send (n-1)/n of the gathered (scattered)
    array, as a ring implementation of them does."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "ppermute":
            total += sum(_nbytes(v.aval) for v in eqn.invars)
        elif name in ("all_gather", "reduce_scatter", "psum_scatter"):
            axes = eqn.params.get("axis_name")
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(axis_sizes[a] for a in axes)
            if name == "all_gather":
                total += (n - 1) * sum(_nbytes(v.aval) for v in eqn.invars)
            else:
                total += (n - 1) / n * sum(_nbytes(v.aval) for v in eqn.invars)
        subs = [collective_bytes(sub, axis_sizes) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
        if name == "scan":
            total += eqn.params["length"] * sum(subs)
        elif name == "cond":
            total += max(subs, default=0.0)
        else:
            total += sum(subs)
    return total


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
