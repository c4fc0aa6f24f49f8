"""Train a decoder-only LM on a mesh.

    python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=runs/tiny \
        [--config.train.steps=2000 --config.mesh.fsdp=2 ...]

Writes into --workdir: config.json, metrics.jsonl, tb/, checkpoints/,
summary.json and loss.png. Rerunning with the same workdir resumes from the
latest checkpoint, exactly (same params as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from atoll.configs import lm as lm_config
from atoll.configs.validation import ConfigError
from atoll.core import flops, optim
from atoll.core.transformer import Transformer, TransformerConfig, count_params
from atoll.data import text
from atoll.experiments import outputs
from atoll.parallel import (checkpoint, collectives, context_lm, distributed, experts, islands, mesh as mesh_lib,
                            runtime, sharding, train_state)

_CONFIG = config_flags.DEFINE_config_file("config", "atoll/configs/lm.py:tiny", "LM config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "Save and stop at this step (the run resumes later).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_RESTORE = flags.DEFINE_enum("restore", "latest", ["latest", "latest_valid"],
                             "latest: resume from the newest checkpoint and stop if it is damaged; latest_valid: "
                             "walk back to the newest intact one.")
_FRESH_ISLANDS = flags.DEFINE_bool(
    "restore_outer_into_fresh_islands", False,
    "Resume a run with a different island count: every new island starts from the saved outer params "
    "(inner and outer optimizer states start fresh).")

# Fields that fix the shapes of the saved state: a workdir's checkpoints only fit these.
_STATE_FIELDS = ("model", "outer")
# ... except these, which only place the same state's computation (like config.mesh).
_PLACEMENT_FIELDS = ("model.context_parallel",)


def _check_workdir_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    now = json.loads(config.to_json_best_effort())
    # runs saved before config.model.moe existed are dense: the default moe block
    saved.get("model", {}).setdefault("moe", json.loads(lm_config.moe_config().to_json_best_effort()))
    diffs = [
        f"{section}.{k}: {saved.get(section, {}).get(k)!r} -> {now[section].get(k)!r}"
        for section in _STATE_FIELDS
        for k in sorted(set(saved.get(section, {})) | set(now[section]))
        if saved.get(section, {}).get(k) != now[section].get(k) and f"{section}.{k}" not in _PLACEMENT_FIELDS
    ]
    if diffs:
        raise ConfigError(
            f"{workdir} holds a run with a different model ({'; '.join(diffs)}); "
            "resume it with its own config or choose a new --workdir"
        )


def _check_against_mesh(config, mesh) -> None:
    sizes = mesh_lib.mesh_sizes(mesh)
    batch_shards = sizes["island"] * sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if config.train.batch_size % batch_shards:
        raise ConfigError(
            f"config.train.batch_size = {config.train.batch_size} must be divisible by island × data × fsdp × "
            f"expert = {batch_shards} (the batch is split over all four)"
        )
    batch_devices = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if config.model.moe.num_experts and config.model.moe.dispatch == "dropless" and batch_devices > 1:
        raise ConfigError(
            f"config.model.moe.dispatch = 'dropless' sorts the whole batch's assignments by expert; with the batch "
            f"split over data × fsdp × expert = {batch_devices} devices XLA would gather it onto every device "
            "(each doing the whole batch's expert work). Use dispatch = 'capacity', or one device per island, "
            "until the per-shard sort arrives with the grouped-matmul kernel")
    if config.model.d_model % sizes["fsdp"]:
        raise ConfigError(f"config.model.d_model = {config.model.d_model} must be divisible by "
                          f"mesh fsdp = {sizes['fsdp']}")
    C = sizes["context"]
    if config.model.context_parallel is not None and C > 1 and config.data.seq_len % (2 * C):
        raise ConfigError(
            f"config.data.seq_len = {config.data.seq_len} must be a multiple of 2 × mesh context = {2 * C}: "
            f"config.model.context_parallel = {config.model.context_parallel!r} gives each of the {C} devices "
            "two chunks of the sequence (zig-zag layout)")
    in_shard_map = config.model.context_parallel is not None and C > 1
    if config.model.attention_impl == "pallas" and mesh.size > 1 and not in_shard_map:
        raise ConfigError(
            f"config.model.attention_impl = 'pallas' on a mesh of {mesh.size} devices needs "
            "config.model.context_parallel (and mesh context > 1): XLA cannot split the kernels itself and would "
            "gather every input; context parallelism runs them per device inside shard_map. Otherwise use "
            "'cudnn' (or None) on a multi-device mesh")
    if config.model.moe.num_experts and config.model.moe.grouped_matmul_impl == "pallas" and mesh.size > 1:
        raise ConfigError(
            f"config.model.moe.grouped_matmul_impl = 'pallas' on a mesh of {mesh.size} devices: XLA cannot split "
            "the kernel itself and would gather every token to each device (the dropless dispatch sorts the "
            "whole batch). Use it on one device, or 'xla' (ragged_dot, or None) on a mesh")


def _context_bytes(config, mesh) -> dict | None:
    """What one device sends per attention layer and train step under config.model.context_parallel
    (None without a strategy; zeros on a context axis of 1)."""
    m = config.model
    if m.context_parallel is None:
        return None
    return context_lm.bytes_per_layer(
        m.context_parallel, mesh_lib.mesh_sizes(mesh), batch_size=config.train.batch_size,
        seq_len=config.data.seq_len, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        dtype_bytes=jnp.dtype(m.dtype).itemsize)


def _global_batch(local_BT: np.ndarray, mesh) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local_BT)


def _local_rows(rows: np.ndarray) -> np.ndarray:
    n = len(rows) // jax.process_count()
    return rows[jax.process_index() * n: (jax.process_index() + 1) * n]


def evaluate(eval_step, params, windows_NT1: np.ndarray, batch_size: int, mesh) -> float:
    losses = [
        eval_step(params, _global_batch(_local_rows(windows_NT1[i: i + batch_size]), mesh))
        for i in range(0, len(windows_NT1), batch_size)
    ]
    return float(np.mean(jax.device_get(losses)))


class _Replicated:
    """One model replica over the whole mesh (island = 1), or DDP across islands:
    the batch also splits over `island`, so gradients are all-reduced across
    islands every step."""

    def __init__(self, model, tx, mesh, seq_len):
        self.model, self.tx, self.mesh, self.seq_len = model, tx, mesh, seq_len
        self.shardings = train_state.state_shardings(model, tx, mesh, seq_len)
        self.step_fn = train_state.make_train_step(model, tx, mesh, seq_len, self.shardings)
        self.param_shardings = self.shardings["params"]
        M = mesh_lib.mesh_sizes(mesh)["island"]
        n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.abstract_state()["params"]))
        self.ddp_step_bytes = islands.ddp_step_bytes(n, M)
        self.wire = islands.WireBytes(self.ddp_step_bytes, self.ddp_step_bytes)

    def init(self, rng):
        return train_state.init_state(self.model, self.tx, self.mesh, self.seq_len, rng, self.shardings)

    def abstract_state(self):
        return train_state.abstract_state(self.model, self.tx, self.seq_len, self.shardings)

    def put_batch(self, local_BT1):
        return _global_batch(local_BT1, self.mesh)

    def after_step(self, state, step):
        return state, {}, self.wire

    def tokens_at(self, step, tokens_per_step):
        return step * tokens_per_step

    def eval_params(self, state):
        return state["params"]


class _Islands(islands.IslandTrainer):
    """Low-communication training: one replica per island, synced by config.outer."""

    def __init__(self, model, tx, mesh, seq_len, spec, schedule):
        super().__init__(model, tx, spec, mesh, seq_len, schedule)
        self.param_shardings = self.inner_shardings["params"]


# Engines (jitted steps, syncs and their caches; no run state) by configuration:
# a process that trains one configuration again (a resumed run, a notebook's
# rerun, a test's straight and split runs) skips tracing it again, most of a
# small run's start-up. Data, ledgers and checkpoints stay per run.
_ENGINES: dict[str, tuple] = {}
_ENGINE_CACHE_SIZE = 4
# config.train fields the engine does not depend on (the loop's cadence and checkpoint
# policy): runs differing only in these share one engine.
_LOOP_ONLY_FIELDS = ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                     "keep_checkpoint_every", "checkpoint_mode")


def _engine(config, mesh, model_config: TransformerConfig):
    """(model, lr schedule, engine, eval step) for this configuration and mesh."""
    saved = json.loads(config.to_json_best_effort())
    saved["train"] = {k: v for k, v in saved["train"].items() if k not in _LOOP_ONLY_FIELDS}
    key = json.dumps({**{k: saved.get(k) for k in ("model", "train", "outer", "mesh")},
                      "seq_len": config.data.seq_len, "axes": list(mesh.axis_names),
                      "devices": [int(d.id) for d in mesh.devices.flat], "processes": jax.process_count()},
                     sort_keys=True)
    if key not in _ENGINES:
        model = Transformer(model_config, expert_fn=experts.expert_fn_for(mesh),
                            attention_fn=context_lm.attention_fn_for(mesh, model_config.context_parallel))
        tx, schedule = optim.adamw_from_config(config.train)
        spec, seq_len = lm_config.outer_spec(config), config.data.seq_len
        engine = (_Replicated(model, tx, mesh, seq_len) if spec is None
                  else _Islands(model, tx, mesh, seq_len, spec, lm_config.island_schedule(config)))
        eval_fn = train_state.make_eval_step(model, mesh, engine.param_shardings)
        if len(_ENGINES) >= _ENGINE_CACHE_SIZE:
            _ENGINES.pop(next(iter(_ENGINES)))
        _ENGINES[key] = (model, schedule, engine, eval_fn)
    return _ENGINES[key]


def _saved_island_count(workdir: Path) -> int | None:
    path = workdir / "config.json"
    if not path.exists() or not (workdir / "checkpoints").exists():
        return None
    return json.loads(path.read_text()).get("mesh", {}).get("island")


def _resume(ckpt: checkpoint.Checkpointer, engine, restore: str, fresh_islands: bool):
    """(step, state, extra) from the workdir's checkpoints, or None for a new run."""
    if ckpt.latest_step() is None:
        return None
    if fresh_islands:
        step = ckpt.latest_step()
        saved = checkpoint.read_on_host(ckpt.directory, step)
        state = engine.init_from_params(jax.tree.map(lambda x: x[0], saved["outer"]["params"]), step)
        return step, state, checkpoint.read_extra(ckpt.directory, step)
    if restore == "latest_valid":
        found = ckpt.restore_latest_valid(engine.abstract_state(), log=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise checkpoint.CheckpointError(f"no intact checkpoint in {ckpt.directory}")
        return found
    step = ckpt.latest_step()
    return (step, *ckpt.restore(step, engine.abstract_state()))


def _restart_checkpoints(workdir: Path, ckpt, make_ckpt, resumed, saved_islands: int, config_json: dict):
    """After regrouping into another island count: the old islands' checkpoints
    move aside (kept), and the new islands' state is saved at once."""
    ckpt.close()
    aside = workdir / f"checkpoints.island{saved_islands}"
    step, state, extra = resumed
    if outputs.is_writer():
        (workdir / "checkpoints").rename(aside)
        print(f"the {saved_islands} islands' checkpoints are kept in {aside}; "
              f"{config_json['mesh']['island']} fresh islands start from their outer params at step {step}",
              flush=True)
    distributed.barrier("atoll_regroup")
    ckpt = make_ckpt()
    ckpt.save(step, state, dict(extra, config=config_json))
    ckpt.wait()
    return ckpt


def _island_fields(loss, ledger: islands.CommLedger | None, tokens: int) -> dict:
    """The per-island spread of the loss (islands train apart) and the bytes so far."""
    out = {}
    if np.ndim(loss):  # one loss per island
        out["loss_spread"] = float(np.ptp(loss))
    if ledger is not None:
        out.update(comm_sent_bytes=ledger.sent, comm_received_bytes=ledger.received, ddp_bytes=ledger.ddp,
                   tokens=tokens)
    return out


def _moe_fields(moe_metrics: dict, blocks: list[int], per_island: bool) -> dict:
    """Routing figures per MoE layer for metrics.jsonl, as moe/block<i>/<name>
    (load_fraction a list over experts); island runs average over islands."""
    if not moe_metrics:
        return {}
    m = {k: np.mean(np.asarray(v), axis=0) if per_island else np.asarray(v) for k, v in moe_metrics.items()}
    out = {"moe/aux_loss": float(m.pop("aux_loss"))}
    for name, values in m.items():
        for block, value in zip(blocks, values):
            out[f"moe/block{block}/{name}"] = value.tolist() if np.ndim(value) else float(value)
    return out


@dataclasses.dataclass
class RunResult:
    summary: dict
    state: dict  # the final train state (sharded arrays)


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, stop_at_step: int | None = None,
    progress: bool = True, restore: str = "latest", fresh_islands: bool = False,
) -> RunResult:
    """Trains (or resumes) the run in `workdir`. restore: "latest" (stop on a
    damaged checkpoint) or "latest_valid" (fall back to the newest intact one);
    fresh_islands: resume a run saved with another island count (see below)."""
    lm_config.validate(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir_config(workdir, config)
    saved_islands = _saved_island_count(workdir) if config.outer.method not in ("none", "ddp") else None
    if saved_islands not in (None, config.mesh.island) and not fresh_islands:
        raise ConfigError(
            f"{workdir} holds a run with config.mesh.island = {saved_islands}; this run asks for "
            f"{config.mesh.island}. Islands carry their own params and optimizer states, so they cannot be "
            "split or merged; pass --restore_outer_into_fresh_islands to start the new islands from the saved "
            "outer params, or choose a new --workdir")
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    _check_against_mesh(config, mesh)

    c, t = config.model, config.train
    corpus = text.load_corpus(config.data.path, glob=config.data.glob, val_fraction=config.data.val_fraction,
                              cache_dir=config.data.cache_dir, progress=progress)
    if corpus.vocab_size > c.vocab_size:
        raise ConfigError(f"config.model.vocab_size = {c.vocab_size} is smaller than the data's "
                          f"vocabulary ({corpus.vocab_size} tokens in {corpus.source})")
    model_config = TransformerConfig.from_dict(c)
    context_bytes = _context_bytes(config, mesh)
    if context_bytes is not None and outputs.is_writer():
        print(f"context parallelism: {c.context_parallel} over {mesh_lib.mesh_sizes(mesh)['context']} devices, "
              f"{context_bytes['total'] / 2**20:.2f} MiB sent per device per attention layer and step "
              f"(forward {context_bytes['forward'] / 2**20:.2f}, backward {context_bytes['backward'] / 2**20:.2f})",
              flush=True)
    moe_blocks = model_config.moe_blocks()
    seq_len = config.data.seq_len
    data = text.BatchIterator(corpus.train, global_batch=t.batch_size, seq_len=seq_len, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    _, schedule, engine, eval_fn = _engine(config, mesh, model_config)
    island_plan = lm_config.island_schedule(config)
    make_ckpt = lambda: checkpoint.Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints,
                                                keep_every=t.keep_checkpoint_every, mode=t.checkpoint_mode)
    ckpt = make_ckpt()
    if ckpt.mode != t.checkpoint_mode and outputs.is_writer():
        print(f"checkpoints: {t.checkpoint_mode} saves are single-process for now; this run uses {ckpt.mode}",
              flush=True)
    config_json = json.loads(config.to_json_best_effort())
    regroup = fresh_islands and saved_islands not in (None, config.mesh.island)
    resumed = _resume(ckpt, engine, restore, regroup)
    if regroup:
        ckpt = _restart_checkpoints(workdir, ckpt, make_ckpt, resumed, saved_islands, config_json)
    if resumed is not None:
        latest, state, extra = resumed
        if outputs.is_writer():
            print(f"resuming {workdir.name} from its checkpoint at step {latest}", flush=True)
        data.restore(extra["data"])
        ledger = islands.CommLedger.from_dict(extra.get("comm"))
        outputs.truncate_metrics(workdir, latest)
    else:
        state = engine.init(jax.random.key(config.seed))
        ledger = islands.CommLedger()
    outputs.write_json(workdir / "config.json", config_json)

    step_fn = engine.step_fn
    islands_count = mesh_lib.mesh_sizes(mesh)["island"]
    low_comm = config.outer.method != "none"
    val_windows = text.eval_windows(corpus.val, num_windows=t.eval_batches * t.batch_size, seq_len=seq_len)
    writer = outputs.MetricsWriter(workdir)
    unit = "bits_per_byte" if corpus.is_bytes else "bits_per_token"
    tokens_per_step = t.batch_size * seq_len

    # XLA:CPU runs every host device's program on a shared pool: with many
    # multi-device steps queued (async dispatch, metrics fetched rarely) their
    # collectives can wait on each other forever ("only 2 of 4 threads arrived"
    # on a 2-core machine). One step in flight at a time costs CPU runs nothing.
    one_in_flight = jax.default_backend() == "cpu" and mesh.size > 1
    step = int(jax.device_get(state["step"]))
    end = t.steps if stop_at_step is None else min(t.steps, stop_at_step)
    rates, val_loss, compiling = [], None, True
    bar = tqdm(total=t.steps, initial=step, desc=f"train {config.name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), step
    while step < end:
        state, metrics = step_fn(state, engine.put_batch(next(data)))
        step += 1
        ckpt.check()  # a failed background save stops the run here
        state, sync_metrics, wire = engine.after_step(state, step)
        if one_in_flight:
            jax.block_until_ready(metrics)
        ledger.add(wire, engine.ddp_step_bytes)
        bar.update(1)
        row = {}
        if sync_metrics:
            row.update({k: float(v) for k, v in sync_metrics.items()})
        log_now = step % t.log_every == 0 or step == end
        eval_now = step % t.eval_every == 0 or step == t.steps
        if log_now or eval_now:  # one host copy of the step's metrics serves both rows
            m = collectives.to_host(metrics)
            row.update(_island_fields(m["loss"], ledger if low_comm else None,
                                      engine.tokens_at(step, tokens_per_step)))
        if log_now:
            now = time.perf_counter()
            rate = (step - last_step) * tokens_per_step / (now - last_time)
            if not compiling:  # the first interval after (re)start holds compilation
                rates.append(rate)
            compiling = False
            last_time, last_step = now, step
            row.update(loss=float(np.mean(m["loss"])), grad_norm=float(np.mean(m["grad_norm"])),
                       learning_rate=float(schedule(step - 1)), tokens_per_sec=rate)
            row.update(_moe_fields(m.get("moe"), moe_blocks, per_island=np.ndim(m["loss"]) > 0))
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if eval_now:
            val_loss = evaluate(eval_fn, engine.eval_params(state), val_windows, t.batch_size, mesh)
            row["val_loss"] = val_loss
            if corpus.is_bytes:
                row["val_bits_per_byte"] = text.bits_per_token(val_loss)
            last_time = time.perf_counter()  # evaluation time is not training throughput
        if row:
            writer.write(step, row)
        if step % t.checkpoint_every == 0 or step == end:
            ckpt.save(step, state, {"data": data.state(), "comm": ledger.to_dict(), "config": config_json})
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

    if val_loss is None:  # resumed a finished run, or stopped before any evaluation
        val_loss = evaluate(eval_fn, engine.eval_params(state), val_windows, t.batch_size, mesh)
    unigram = text.unigram_bits_per_token(corpus)
    summary = {
        "config": config.name,
        "step": step,
        "finished": step >= t.steps,
        "params": count_params(engine.eval_params(state)),
        "active_params": flops.active_params(model_config),
        "val_loss": val_loss,
        f"val_{unit}": text.bits_per_token(val_loss),
        f"unigram_{unit}": unigram,
        "tokens_per_sec": float(np.median(rates)) if rates else None,
        "devices": jax.device_count(),
        "mesh": mesh_lib.mesh_sizes(mesh),
        "data": corpus.source,
    }
    if low_comm:
        summary.update(
            outer=config.outer.method, islands=islands_count, syncs=ledger.syncs,
            bytes_per_island=ledger.sent, bytes_received_per_island=ledger.received,
            peak_bytes_per_step=ledger.peak_step, ddp_bytes_per_island=ledger.ddp,
            bytes_ratio_to_ddp=ledger.ddp / ledger.sent if ledger.sent else None,
            tokens=engine.tokens_at(step, tokens_per_step))
        if island_plan is not None:
            summary["island_schedule"] = {
                "speeds": lm_config.island_speeds(config), "mode": config.outer.heterogeneity,
                "steps_per_period": list(island_plan.steps_M), "rounds_per_period": list(island_plan.rounds_M)}
    if context_bytes is not None:
        summary.update(context_parallel=c.context_parallel, context_bytes_per_device_per_layer=context_bytes)
    outputs.write_json(workdir / "summary.json", summary)
    if moe_blocks:
        outputs.plot_routing(workdir)
    outputs.plot_loss(workdir, unit=unit.replace("_", " "), scale=1 / np.log(2), bar=unigram,
                      bar_label=f"unigram ({unigram:.2f})")
    return RunResult(summary, state)


def report(summary: dict, workdir: Path) -> str:
    unit = "bits_per_byte" if "val_bits_per_byte" in summary else "bits_per_token"
    val, bar = summary[f"val_{unit}"], summary[f"unigram_{unit}"]
    state = "finished" if summary["finished"] else "stopped (rerun the same command to resume)"
    return (
        f"{state} at step {summary['step']}\n"
        f"validation: {val:.3f} {unit.replace('_', ' ')}  vs  unigram bar {bar:.3f}  "
        f"({bar - val:+.3f} below the bar)\n"
        f"outputs in {workdir}: config.json metrics.jsonl summary.json loss.png tb/ checkpoints/"
    )


def main(argv) -> None:
    del argv
    runtime.apply_xla_defaults()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    try:
        multi = distributed.initialize()  # several processes (launch, SLURM, ...) or none
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not multi:  # one process on a CPU: as many host devices as the mesh's fixed axes need
        fixed = [int(n) for n in _CONFIG.value.mesh.values() if int(n) > 0]
        runtime.request_host_devices(int(np.prod(fixed)) if fixed else 1)
    try:
        summary = train(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT.value, progress=_PROGRESS.value,
                        restore=_RESTORE.value, fresh_islands=_FRESH_ISLANDS.value).summary
    except (ConfigError, mesh_lib.MeshError, text.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if outputs.is_writer():
        print(report(summary, Path(_WORKDIR.value).absolute()))


if __name__ == "__main__":
    app.run(main)
