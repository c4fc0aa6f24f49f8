"""Autoregressive sampling from a trained LM (full recompute over a fixed
window; simple and exact, meant for looking at samples, not for serving)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token(model: nn.Module, params, window_1W: jax.Array, pos: jax.Array, key: jax.Array,
                temperature: jax.Array) -> jax.Array:
    logits_V = model.apply({"params": params}, window_1W)[0, pos - 1]
    greedy = jnp.argmax(logits_V)
    sampled = jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def sample_tokens(model: nn.Module, params, prompt: np.ndarray, num_tokens: int, *, window: int,
                  temperature: float = 0.8, seed: int = 0) -> np.ndarray:
    """Continues `prompt` (1-D token ids) by `num_tokens`; temperature 0 is greedy.
    Only the last `window` tokens are seen (rotary positions are relative)."""
    tokens = [int(t) for t in prompt] or [0]
    key = jax.random.key(seed)
    for _ in range(num_tokens):
        context = tokens[-window:]
        buf = np.zeros((1, window), np.int32)  # causal: padding after `pos` is never seen
        buf[0, : len(context)] = context
        key, sub = jax.random.split(key)
        tokens.append(int(_next_token(model, params, jnp.asarray(buf), jnp.int32(len(context)), sub,
                                      jnp.float32(temperature))))
    return np.asarray(tokens[len(prompt):], np.int32)


def sample_text(model: nn.Module, params, prompt: str, num_bytes: int, *, window: int,
                temperature: float = 0.8, seed: int = 0) -> str:
    """Byte-level models: continue a text prompt by `num_bytes` bytes."""
    out = sample_tokens(model, params, np.frombuffer(prompt.encode(), np.uint8), num_bytes, window=window,
                        temperature=temperature, seed=seed)
    return bytes(out.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
