"""The LM train state on a mesh: initialized directly sharded, stepped by one
jitted function with explicit shardings and buffer donation.

The state is a plain dict {"step", "params", "opt_state"}; its shardings come
from the logical annotations of the model (parallel/sharding.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from atoll.core import moe
from atoll.core.transformer import next_token_loss
from atoll.parallel import context_lm, sharding

State = dict[str, Any]


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, within_island: bool = False):
    """The mesh and logical rules that model code's sharding annotations resolve against."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(within_island)):
        yield


def _init_boxed(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, rng: jax.Array) -> State:
    tokens_BT = jnp.zeros((1, seq_len), jnp.int32)
    with nn.logical_axis_rules(()):  # a batch of 1 cannot take activation constraints
        params = model.init(rng, tokens_BT)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh, seq_len: int):
    """NamedShardings of the train state, from the model's logical annotations."""
    abstract = jax.eval_shape(lambda r: _init_boxed(model, tx, seq_len, r), jax.random.key(0))
    return sharding.tree_shardings(abstract, mesh)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, shardings):
    """ShapeDtypeStructs with `shardings` (from state_shardings): the restore target for a checkpoint."""
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(_init_boxed(model, tx, seq_len, r)), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh, seq_len: int, rng: jax.Array,
               shardings=None) -> State:
    """Initializes params and optimizer state directly into their shardings
    (no full copy ever materializes on one device)."""
    shardings = shardings or state_shardings(model, tx, mesh, seq_len)
    init = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model, tx, seq_len, r)), out_shardings=shardings)
    with mesh_context(mesh):
        return init(rng)


def model_batch(model: nn.Module, tokens_BT1: jax.Array):
    """(inputs, targets, positions or None) of windows of T+1 tokens, in the
    token order the model takes (context parallelism: zig-zag)."""
    return context_lm.lm_batch(tokens_BT1, context_lm.layout_context(model))


def loss_fn(model: nn.Module, params, tokens_BT1: jax.Array) -> jax.Array:
    """Next-token loss on windows of T+1 tokens (what evaluation reports)."""
    inputs_BT, targets_BT, positions_BT = model_batch(model, tokens_BT1)
    logits_BTV = model.apply({"params": params}, inputs_BT, positions_BT)
    return next_token_loss(logits_BTV, targets_BT)


def train_loss_fn(model: nn.Module, params, tokens_BT1: jax.Array):
    """(next-token loss + MoE auxiliary losses, (next-token loss, what the MoE
    layers recorded)). A dense model records nothing and adds 0."""
    inputs_BT, targets_BT, positions_BT = model_batch(model, tokens_BT1)
    logits_BTV, recorded = model.apply({"params": params}, inputs_BT, positions_BT, mutable=list(moe.COLLECTIONS))
    ce = next_token_loss(logits_BTV, targets_BT)
    return ce + moe.aux_loss(recorded), (ce, recorded)


def train_step(model: nn.Module, tx: optax.GradientTransformation, state: State, tokens_BT1: jax.Array):
    (_, (loss, recorded)), grads = jax.value_and_grad(
        lambda p: train_loss_fn(model, p, tokens_BT1), has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if recorded.get(moe.LOADS):  # aux-loss-free balancing: the biases move by load, not by gradient
        params = moe.apply_bias_updates(params, state["params"], recorded[moe.LOADS], model.cfg.moe.bias_rate)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if recorded.get(moe.METRICS):
        metrics["moe"] = moe.layer_metrics(recorded)
        metrics["moe"]["aux_loss"] = moe.aux_loss(recorded)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def _in_mesh(fn: Callable, mesh) -> Callable:
    def call(*args):
        with mesh_context(mesh):
            return fn(*args)
    call.jitted = fn  # for .lower() / cost analysis
    return call


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh, seq_len: int,
                    shardings=None) -> Callable:
    """(state, tokens [B, T+1]) -> (state, metrics); the input state is donated."""
    shardings = shardings or state_shardings(model, tx, mesh, seq_len)
    step = jax.jit(
        lambda s, b: train_step(model, tx, s, b),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return _in_mesh(step, mesh)


def make_eval_step(model: nn.Module, mesh, param_shardings) -> Callable:
    """(params, tokens [B, T+1]) -> mean next-token loss in nats."""
    fn = jax.jit(
        lambda p, b: loss_fn(model, p, b),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    return _in_mesh(fn, mesh)
