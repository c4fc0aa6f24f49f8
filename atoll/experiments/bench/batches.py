"""Inputs the benchmarks share (no flags here: benchmarks import each other's helpers)."""

from __future__ import annotations

import jax
import numpy as np


def random_batches(n: int, batch: int, seq_len: int, vocab: int, sharding_=None) -> list[jax.Array]:
    """n token batches [batch, seq_len + 1] on the devices (a fixed seed: runs compare)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        b = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)
        out.append(jax.device_put(b, sharding_) if sharding_ is not None else jax.device_put(b))
    return out
