"""Codecs for what goes on the wire between islands (DiLoCo family).

A payload is a dict of arrays; its size on the wire is exactly
`payload_nbytes(payload)`, the sum of the arrays' bytes (it also takes
`jax.ShapeDtypeStruct`s, so `jax.eval_shape(encode, ...)` does the accounting
without running anything). Everything is pure, jit-able and vmap-able: `fmt`,
`block`, `chunk`, `k` and `bins` are Python statics, and shapes only depend on them
and the input shape. Receivers always decode to float32.

Dense formats (`encode` / `decode`), per-value error for a block with absmax s:
  fp32  exact;
  bf16  round to nearest even, |x - q| <= 2^-9 |x|;
  int8  symmetric, fp32 absmax per block, codes in [-127, 127], |x - q| <= s/254;
  fp4   E3M0 as in Streaming DiLoCo: sign + 3-bit exponent e, e=0 is zero and
        e=1..7 is s * 2^(e-7); nearest representable (linear) value, so
        |x - q| <= max(|x|/3, 2^-7 s).
(all up to float32 rounding slack). fp32/bf16 are not padded (no per-block
scale); int8/fp4 are zero-padded to a multiple of `block`.

Sparse (`topk_encode` / `topk_decode` / `error_feedback_step`): SparseLoCo's
compressor, chunked top-k of |e| with bit-packed indices and `bins`-level values
whose lookup table is the mean of the selected values in each bin (templar's
production compressor).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("fp32", "bf16", "int8", "fp4")
Payload = dict[str, jax.Array]

# E3M0 magnitudes relative to the block absmax, indexed by the exponent code.
_FP4_LEVELS_8 = np.array([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], np.float32)
# Midpoints between consecutive levels: the code is how many of them |x| exceeds.
_FP4_MIDPOINTS_7 = [float(a + b) / 2 for a, b in zip(_FP4_LEVELS_8[:-1], _FP4_LEVELS_8[1:])]


def payload_nbytes(payload) -> int:
    """Bytes on the wire: the sum of the leaves' sizes (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(payload))


def wire_bits_per_value(fmt: str, block: int = 128) -> float:
    """Bits per value on the wire, scales included, padding excluded."""
    _check_fmt(fmt)
    return {"fp32": 32.0, "bf16": 16.0, "int8": 8.0 + 32 / block, "fp4": 4.0 + 32 / block}[fmt]


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"compress format {fmt!r} is not one of {FORMATS}")


# ---------------------------------------------------------------- bit packing

def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Packs the low `bits` bits (1..16) of each code, MSB first, into a dense
    uint8 stream of ceil(n * bits / 8) bytes (n = codes.size; the tail is zero)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"pack_bits: bits must be in 1..16, got {bits}")
    codes_N = codes.reshape(-1).astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
    n = codes_N.shape[0]
    nbytes = -(-n * bits // 8)
    if 8 % bits == 0:  # codes never straddle a byte: shift-and-or, no bit matrix
        per = 8 // bits
        codes_BP = jnp.pad(codes_N, (0, nbytes * per - n)).reshape(nbytes, per)
        shifts_P = jnp.arange(per - 1, -1, -1, dtype=jnp.uint32) * bits
        return jnp.sum(codes_BP << shifts_P, axis=1).astype(jnp.uint8)
    shifts_b = jnp.arange(bits - 1, -1, -1, dtype=jnp.uint32)
    bits_Nb = (codes_N[:, None] >> shifts_b) & 1
    bits_B8 = jnp.pad(bits_Nb.reshape(-1), (0, nbytes * 8 - n * bits)).reshape(nbytes, 8)
    return jnp.sum(bits_B8 << jnp.arange(7, -1, -1, dtype=jnp.uint32), axis=1).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, count: int) -> jax.Array:
    """Inverse of `pack_bits`: the first `count` codes as uint32[count]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"unpack_bits: bits must be in 1..16, got {bits}")
    packed_B = packed.reshape(-1).astype(jnp.uint32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts_P = jnp.arange(per - 1, -1, -1, dtype=jnp.uint32) * bits
        return ((packed_B[:, None] >> shifts_P) & ((1 << bits) - 1)).reshape(-1)[:count]
    bits_M = ((packed_B[:, None] >> jnp.arange(7, -1, -1, dtype=jnp.uint32)) & 1).reshape(-1)
    bits_Nb = bits_M[: count * bits].reshape(count, bits)
    return jnp.sum(bits_Nb << jnp.arange(bits - 1, -1, -1, dtype=jnp.uint32), axis=1)


# ---------------------------------------------------------------- dense formats

def _blocks(x: jax.Array, block: int) -> jax.Array:
    x_N = x.reshape(-1).astype(jnp.float32)
    return jnp.pad(x_N, (0, -x_N.shape[0] % block)).reshape(-1, block)


def encode(x: jax.Array, fmt: str, block: int = 128) -> Payload:
    """Encodes a float array of any shape; see the module docstring for the bounds."""
    _check_fmt(fmt)
    if fmt == "fp32":
        return {"values": x.reshape(-1).astype(jnp.float32)}
    if fmt == "bf16":
        return {"values": x.reshape(-1).astype(jnp.float32).astype(jnp.bfloat16)}
    x_GB = _blocks(x, block)
    s_G = jnp.max(jnp.abs(x_GB), axis=1)
    if fmt == "int8":
        step_G1 = jnp.where(s_G > 0, s_G / 127, 1.0)[:, None]  # all-zero block: codes 0
        codes_GB = jnp.clip(jnp.round(x_GB / step_G1), -127, 127).astype(jnp.int8)
        return {"codes": codes_GB.reshape(-1), "scale": s_G}
    mag_GB = jnp.abs(x_GB)
    e_GB = sum((mag_GB > s_G[:, None] * m).astype(jnp.uint32) for m in _FP4_MIDPOINTS_7)
    sign_GB = ((x_GB < 0) & (e_GB > 0)).astype(jnp.uint32)
    return {"codes": pack_bits((sign_GB << 3) | e_GB, 4), "scale": s_G}


def decode(payload: Payload, fmt: str, shape: tuple[int, ...], block: int = 128) -> jax.Array:
    """Float32 array of `shape` from `encode(x, fmt, block)` with x.shape == shape."""
    _check_fmt(fmt)
    n = math.prod(shape)
    if fmt in ("fp32", "bf16"):
        return payload["values"].astype(jnp.float32).reshape(shape)
    s_G = payload["scale"]
    g = s_G.shape[0]
    if fmt == "int8":
        q_GB = payload["codes"].reshape(g, block).astype(jnp.float32) * (s_G / 127)[:, None]
    else:
        c_GB = unpack_bits(payload["codes"], 4, g * block).reshape(g, block)
        mag_GB = s_G[:, None] * jnp.asarray(_FP4_LEVELS_8)[c_GB & 7]  # power-of-two levels: exact
        q_GB = jnp.where(c_GB >> 3 == 1, -mag_GB, mag_GB)
    return q_GB.reshape(-1)[:n].reshape(shape)


# ---------------------------------------------------------------- sparse top-k

def _topk_dims(n: int, chunk: int, k: int, bins: int) -> tuple[int, int, int, int]:
    """(chunks C, k actually kept, index bits, code bits). k is clamped to the
    chunk size, and to n when the tensor is smaller than one chunk."""
    if chunk < 2 or k < 1:
        raise ValueError(f"topk: need chunk >= 2 and k >= 1, got chunk={chunk}, k={k}")
    if bins < 2 or bins & (bins - 1) or bins > 1 << 16:
        raise ValueError(f"topk: bins must be a power of two in 2..65536, got {bins}")
    return -(-n // chunk), min(k, chunk, max(n, 1)), (chunk - 1).bit_length(), bins.bit_length() - 1


def topk_encode(e: jax.Array, chunk: int = 4096, k: int = 64, bins: int = 4,
                range_sigma: float = 6.0) -> Payload:
    """Per chunk of `chunk` values, the k largest |e|: indices packed with
    ceil(log2 chunk) bits each, values as log2(bins)-bit codes into a fp32 table
    (bin means over all chunks; bins uniform over mu +- range_sigma * sigma)."""
    n = math.prod(e.shape)
    c, k, idx_bits, code_bits = _topk_dims(n, chunk, k, bins)
    e_CX = jnp.pad(e.reshape(-1).astype(jnp.float32), (0, c * chunk - n)).reshape(c, chunk)
    _, idx_CK = jax.lax.top_k(jnp.abs(e_CX), k)
    v_CK = jnp.take_along_axis(e_CX, idx_CK, axis=1)
    # The last chunk may be padded; its padding must not skew the statistics.
    w_CK = ((jnp.arange(c)[:, None] * chunk + idx_CK) < n).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w_CK), 1.0)
    mu = jnp.sum(v_CK * w_CK) / count
    sigma = jnp.sqrt(jnp.sum(jnp.square(v_CK - mu) * w_CK) / count)
    lo, width = mu - range_sigma * sigma, 2 * range_sigma * sigma / bins
    width = jnp.where(width > 0, width, 1.0)  # all values equal: everything in bin 0
    code_CK = jnp.clip(jnp.floor((v_CK - lo) / width), 0, bins - 1).astype(jnp.int32)
    onehot_CKb = jax.nn.one_hot(code_CK, bins, dtype=jnp.float32) * w_CK[..., None]
    hits_b = jnp.sum(onehot_CKb, axis=(0, 1))
    sums_b = jnp.einsum("ck,ckb->b", v_CK, onehot_CKb)
    centre_b = lo + (jnp.arange(bins) + 0.5) * width
    table_b = jnp.where(hits_b > 0, sums_b / jnp.maximum(hits_b, 1.0), centre_b)
    return {"indices": pack_bits(idx_CK, idx_bits), "codes": pack_bits(code_CK, code_bits),
            "table": table_b.astype(jnp.float32)}


def topk_decode(payload: Payload, shape: tuple[int, ...], chunk: int = 4096, k: int = 64,
                bins: int = 4) -> jax.Array:
    """Dense float32 array of `shape`: zero except the sent positions."""
    n = math.prod(shape)
    c, k, idx_bits, code_bits = _topk_dims(n, chunk, k, bins)
    idx_CK = unpack_bits(payload["indices"], idx_bits, c * k).reshape(c, k).astype(jnp.int32)
    v_CK = payload["table"][unpack_bits(payload["codes"], code_bits, c * k).reshape(c, k)]
    out_CX = jnp.zeros((c, chunk), jnp.float32).at[jnp.arange(c)[:, None], idx_CK].set(v_CK)
    return out_CX.reshape(-1)[:n].reshape(shape)


def error_feedback_step(e: jax.Array, delta: jax.Array, beta: float | jax.Array, chunk: int = 4096,
                        k: int = 64, bins: int = 4, range_sigma: float = 6.0
                        ) -> tuple[Payload, jax.Array]:
    """acc = beta * e + delta; sends topk(acc) and keeps the rest: (payload, acc - sent)."""
    acc = beta * e.astype(jnp.float32) + delta.astype(jnp.float32)
    payload = topk_encode(acc, chunk, k, bins, range_sigma)
    return payload, acc - topk_decode(payload, acc.shape, chunk, k, bins)
