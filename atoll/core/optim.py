"""Inner optimizer: AdamW with linear warmup and cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=max(warmup_steps, 1),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio,
    )


def adamw(
    lr: float, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
    b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
    grad_clip: float = 1.0,
):
    """AdamW; weight decay applies to weight matrices, not to norms' scales."""
    schedule = lr_schedule(lr, warmup_steps, total_steps, min_lr_ratio)
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def adamw_from_config(t):
    """`adamw` with every hyperparameter from a config's `train` section."""
    return adamw(
        t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio,
        b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
    )


def decay_mask(params):
    """True for leaves that weight decay applies to: everything but norm scales
    (judged by name, since stacked layers give scales two dimensions)."""
    def decays(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names and names[-1] == "value":  # inside a flax LogicallyPartitioned box
            names = names[:-1]
        return not names or names[-1] != "scale"
    return jax.tree_util.tree_map_with_path(decays, params)
