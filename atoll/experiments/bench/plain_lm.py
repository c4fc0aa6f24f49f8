"""The baseline for lm_step: the same LM written directly in plain Flax Linen,
the way a researcher would without atoll (single device, nn.Dense, no logical
axes, no scan, optax AdamW, one jitted step with donation). lm_step times it
in the same run, so atoll's structure is judged by the ratio."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from atoll.core.transformer import TransformerConfig


class _Block(nn.Module):
    c: TransformerConfig

    @nn.compact
    def __call__(self, x):
        c, dt = self.c, jnp.dtype(self.c.dtype)
        B, T, _ = x.shape
        h = nn.RMSNorm(dtype=dt)(x)
        q = nn.Dense(c.num_heads * c.head_dim, use_bias=False, dtype=dt)(h).reshape(B, T, c.num_heads, c.head_dim)
        k = nn.Dense(c.num_kv_heads * c.head_dim, use_bias=False, dtype=dt)(h).reshape(B, T, c.num_kv_heads, c.head_dim)
        v = nn.Dense(c.num_kv_heads * c.head_dim, use_bias=False, dtype=dt)(h).reshape(B, T, c.num_kv_heads, c.head_dim)
        pos = jnp.arange(T)[None, :, None, None].astype(jnp.float32)
        freq = c.rope_theta ** (-jnp.arange(0, c.head_dim // 2, dtype=jnp.float32) * 2 / c.head_dim)
        sin, cos = jnp.sin(pos * freq), jnp.cos(pos * freq)

        def rope(z):
            z1, z2 = jnp.split(z.astype(jnp.float32), 2, axis=-1)
            return jnp.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1).astype(dt)

        impl = "cudnn" if jax.default_backend() == "gpu" and dt != jnp.float32 else "xla"
        o = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True, implementation=impl)
        x = x + nn.Dense(c.d_model, use_bias=False, dtype=dt)(o.reshape(B, T, -1))
        h = nn.RMSNorm(dtype=dt)(x)
        g = nn.Dense(c.mlp_dim, use_bias=False, dtype=dt)(h)
        u = nn.Dense(c.mlp_dim, use_bias=False, dtype=dt)(h)
        return x + nn.Dense(c.d_model, use_bias=False, dtype=dt)(nn.silu(g) * u)


class PlainLM(nn.Module):
    c: TransformerConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.dtype(c.dtype))
        x = embed(tokens)
        for _ in range(c.num_layers):
            x = _Block(c)(x)
        x = nn.RMSNorm(dtype=jnp.dtype(c.dtype))(x)
        if c.tie_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return nn.Dense(c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype))(x).astype(jnp.float32)


def make_plain_step(c: TransformerConfig, seq_len: int, lr: float = 3e-4):
    """Returns (state, step) where step(state, tokens [B, T+1]) -> (state, loss)."""
    model = PlainLM(c)
    tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1)
    params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    state = (params, tx.init(params))

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return state, jax.jit(step, donate_argnums=(0,))
