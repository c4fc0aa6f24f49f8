"""The LM train step and inputs the benchmarks share (no flags here, so
benchmarks can import it side by side)."""

from __future__ import annotations

import jax
import numpy as np

from atoll.configs import lm as lm_config
from atoll.core import optim
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.parallel import context_lm, mesh as mesh_lib, sharding, train_state


def random_batches(n: int, batch: int, seq_len: int, vocab: int, sharding_=None) -> list[jax.Array]:
    """n token batches [batch, seq_len + 1] on the devices (a fixed seed: runs compare)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        b = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)
        out.append(jax.device_put(b, sharding_) if sharding_ is not None else jax.device_put(b))
    return out


def lm_train_setup(config):
    """(state, step, batches, TransformerConfig): atoll's train step built exactly as
    train_lm builds it, its initial state, and two random batches on the mesh."""
    lm_config.validate(config)
    c, t = TransformerConfig.from_dict(config.model), config.train
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    model = Transformer(c, attention_fn=context_lm.attention_fn_for(mesh, c.context_parallel))
    tx, _ = optim.adamw_from_config(t)
    state = train_state.init_state(model, tx, mesh, config.data.seq_len, jax.random.key(0))
    step = train_state.make_train_step(model, tx, mesh, config.data.seq_len)
    batches = random_batches(2, t.batch_size, config.data.seq_len, c.vocab_size, sharding.batch_sharding(mesh))
    return state, step, batches, c
