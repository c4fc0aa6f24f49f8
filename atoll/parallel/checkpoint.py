"""Checkpoints of the sharded train state: async, atomic, verified, and
restorable onto any mesh. Plain orbax checkpoints underneath.

A checkpoint step directory holds three orbax items:

    state/      the train state (params, optimizer states of every island,
                outer state, step) as sharded arrays, written by every process
    extra/      JSON: data iterator state, byte ledger, config, ...
    integrity/  JSON: a fingerprint of every state leaf (see `fingerprints`)

Save modes (`mode=`):

    sync   the loop waits until the step is on disk;
    async  orbax's async save: the loop waits for the device→host copy, the
           write runs in orbax's background thread;
    lazy   DataStates-LLM's idea: the device→host copy is only *issued* (into
           host memory, pinned where the platform has it) and runs behind the
           next training steps; a background thread waits for it and persists
           it. The copy reads the buffers before any later (donating) step
           may reuse them: the runtime orders the copy's reads before the
           next step's writes, and the snapshot owns its own host buffers.
           Single-process only for now: with several processes it falls back
           to async (see __init__), and `mode` says which one runs.

One save is in flight at a time: the next save (or `wait`) waits for the
previous one and raises its error, so a failed background save stops the
training loop with a message instead of failing silently in a thread.

Atomicity is orbax's: a step is written to a temporary directory and renamed
when complete, so a process killed mid-save leaves the previous steps intact
and the partial one invisible (and cleaned up at the next start). Integrity
is ours: every restore recomputes the fingerprints and names the step and the
leaf that differ; a file that cannot be read is reported with its step too.
`restore_latest_valid` walks back to the newest intact step.

Restores go onto whatever shardings the caller's abstract state names, so a
run may resume on a different mesh or device count (the fingerprints do not
depend on the sharding).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from atoll.parallel import distributed

SAVE_MODES = ("sync", "async", "lazy")
_ITEMS = ("state", "extra", "integrity")


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be restored as asked, or a save that failed."""


# ---------------------------------------------------------------- integrity


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Σ bits(x_i)·(2654435761·i + 1) mod 2^32 over the flattened leaf: every
    bit and its position count, and integer sums do not depend on how the
    array is sharded or in which order shards are added."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
    if x.dtype.itemsize == 8:  # bitcast to uint32 adds a trailing axis of 2
        bits = bits.reshape(x.shape + (2,))
    bits = bits.astype(jnp.uint32)
    index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))
_fingerprint_leaf = jax.jit(_leaf_fingerprint)


def _fingerprints_jit(tree: Any) -> Any:
    """Dispatches the fingerprints (one program; leaf by leaf when the leaves
    live on different devices, as in states built by hand)."""
    try:
        return _fingerprint_tree(tree)
    except ValueError:
        return jax.tree.map(_fingerprint_leaf, tree)


def fingerprints(state: Any) -> dict[str, int]:
    """{leaf path: fingerprint} of a (sharded) state, computed on its devices."""
    return _to_dict(_fingerprints_jit(state))


def _to_dict(values: Any) -> dict[str, int]:
    values = jax.device_get(values)
    return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(values)}


# ---------------------------------------------------------------- snapshots


def _host_sharding(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """`s` in pinned host memory, or `s` itself where the devices have none."""
    device = next(iter(s.device_set))
    kinds = {m.kind for m in device.addressable_memories()} if hasattr(device, "addressable_memories") else set()
    return s.with_memory_kind("pinned_host") if "pinned_host" in kinds else s


_device_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # outputs never alias (undonated) inputs


def snapshot(state: Any) -> Any:
    """A copy of `state` in host memory (pinned where available), issued
    asynchronously: returns at once, the copy runs behind later device work."""
    leaves, treedef = jax.tree.flatten(state)
    host = [_host_sharding(x.sharding) for x in leaves]
    if any(h is x.sharding for h, x in zip(host, leaves)):  # no host memory kind: copy on the device instead
        return _device_copy(state)
    return jax.tree.unflatten(treedef, jax.device_put(leaves, host))  # one batched transfer


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores the whole train state under `directory`.

    keep: the newest `keep` steps stay; keep_every: steps divisible by it stay
    as well (0: none); mode: sync | async | lazy (see the module docstring).
    """

    def __init__(self, directory: str | Path, *, keep: int = 2, keep_every: int = 0, mode: str = "async"):
        if mode not in SAVE_MODES:
            raise ValueError(f"checkpoint mode {mode!r}: choose one of {list(SAVE_MODES)}")
        if keep < 1 or keep_every < 0:
            raise ValueError(f"keep must be >= 1 and keep_every >= 0 (got {keep}, {keep_every})")
        self.directory = Path(directory).absolute()
        if mode == "lazy" and jax.process_count() > 1:
            # orbax's sync save, run from a side thread, takes cross-process
            # barriers while the main thread runs the step's collectives: the
            # two interleave differently on each process and deadlock (seen
            # with 2 processes on gloo). Orbax's async path is built for this.
            mode = "async"
        self.mode = mode
        pp = ocp.checkpoint_managers
        policy = pp.LatestN(keep)
        if keep_every:
            policy = pp.AnyPreservationPolicy([policy, pp.EveryNSteps(keep_every)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=(mode == "async"), create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_step: int | None = None

    # ------------------------------------------------------------------ save

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict) -> float:
        """Starts (sync: does) a save of `state` at `step`; returns the seconds
        the caller was held. Raises CheckpointError if an earlier background
        save failed. Safe with buffer donation: `state` may be donated to the
        next step as soon as this returns."""
        t0 = time.perf_counter()
        self.check()
        if self.mode == "lazy":
            self._join()
            snap, prints = snapshot(state), _fingerprints_jit(state)  # both only dispatched
            self._thread = threading.Thread(target=self._persist, args=(step, snap, prints, dict(extra)),
                                            name=f"atoll-checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            prints = fingerprints(state)
            try:
                self._write(step, state, prints, extra)
            except Exception as e:
                raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {e}") from e
        return time.perf_counter() - t0

    def _write(self, step: int, state: Any, prints: dict, extra: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra),
            integrity=ocp.args.JsonSave({"fingerprints": prints})), force=True)

    def _persist(self, step: int, snap: Any, prints: Any, extra: dict) -> None:
        try:
            snap = jax.block_until_ready(snap)
            self._write(step, snap, _to_dict(prints), extra)
            self._manager.wait_until_finished()
        except BaseException as e:  # handed to the training loop by check() / wait()
            self._error, self._error_step = e, step

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raises CheckpointError if a background save has failed (cheap: call it every step)."""
        if self._error is not None:
            e, step = self._error, self._error_step
            self._error = None
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed in the "
                                  f"background: {type(e).__name__}: {e}") from e
        if self.mode == "async":
            try:
                self._manager.check_for_errors()
                if not self._manager.is_saving_in_progress():
                    self._manager.wait_until_finished()  # returns at once, or raises a finished save's error
            except Exception as e:
                raise CheckpointError(f"a background save in {self.directory} failed: {e}") from e

    def wait(self) -> None:
        """Blocks until every started save is on disk; raises its error if one failed."""
        self._join()
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"a background save in {self.directory} failed: {e}") from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    # --------------------------------------------------------------- restore

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` onto the shardings named by `abstract_state`
        (ShapeDtypeStructs) and checks it against the saved fingerprints."""
        self._check_shapes(step, abstract_state)
        step_dir = self.directory / str(step)
        args = {"state": ocp.args.StandardRestore(abstract_state), "extra": ocp.args.JsonRestore()}
        has_integrity = (step_dir / "integrity").exists()
        if has_integrity:
            args["integrity"] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: it cannot be read "
                                  f"({type(e).__name__}: {_first_line(e)}); rerun with --restore=latest_valid "
                                  "to resume from the newest intact step") from e
        if has_integrity:
            _verify(step, self.directory, restored.integrity["fingerprints"], fingerprints(restored.state))
        return restored.state, restored.extra

    def restore_latest_valid(self, abstract_state: Any, log=print) -> tuple[int, Any, dict] | None:
        """The newest step that restores and verifies, walking back past
        damaged ones (each reported through `log`, then moved aside to
        STEP.damaged so the resumed run can save that step again; nothing is
        deleted); None if there are none."""
        found, damaged = None, []
        for step in reversed(self.all_steps()):
            try:
                state, extra = self.restore(step, abstract_state)
                found = step, state, extra
                break
            except CheckpointError as e:
                if "different model" in str(e):
                    raise
                log(f"skipping damaged checkpoint: {e}")
                damaged.append(step)
        if damaged:
            self._set_aside(damaged, log)
        return found

    def _set_aside(self, steps: list[int], log) -> None:
        if jax.process_index() == 0:
            for step in steps:
                aside = self.directory / f"{step}.damaged"
                n = 1
                while aside.exists():
                    aside, n = self.directory / f"{step}.damaged.{n}", n + 1
                (self.directory / str(step)).rename(aside)
                log(f"moved damaged checkpoint step {step} to {aside}")
        distributed.barrier("atoll_checkpoint_set_aside")
        self._manager.reload()

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """A different model is a config problem, not damage: say so before reading."""
        try:
            saved = _saved_tree(self.directory / str(step) / "state")
        except Exception:  # unreadable metadata: the restore reports the damage
            return
        want = {_path_name(p): (tuple(x.shape), np.dtype(x.dtype))
                for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        have = {_path_name(p): (tuple(x.shape), np.dtype(x.dtype))
                for p, x in jax.tree_util.tree_leaves_with_path(saved) if hasattr(x, "shape")}
        if want == have:
            return
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        differ = [f"{k}: saved {have[k][0]} {have[k][1]}, now {want[k][0]} {want[k][1]}"
                  for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        what = "; ".join(([f"not in the checkpoint: {missing[:3]}"] if missing else [])
                         + ([f"only in the checkpoint: {extra[:3]}"] if extra else []) + differ[:3])
        raise CheckpointError(f"checkpoint step {step} in {self.directory} holds a different model or "
                              f"optimizer state than this run ({what})")


def _path_name(path) -> str:
    """'opt_state/0/mu/embedding': the same for a namedtuple field and the dict
    key orbax's metadata turns it into."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _verify(step: int, directory: Path, saved: dict, now: dict) -> None:
    bad = sorted(k for k in saved if now.get(k) != saved[k])
    if bad or set(now) != set(saved):
        raise CheckpointError(f"checkpoint step {step} in {directory} is damaged: {len(bad)} of {len(saved)} "
                              f"arrays differ from what was saved (first: {bad[:3]}); rerun with "
                              "--restore=latest_valid to resume from the newest intact step")


# ---------------------------------------------------------------- reading without atoll's trainer


class _NoStepMetadataWarning(logging.Filter):
    """Drops orbax's "Metadata file does not exist" warning: opened at the item
    folder (step/state), orbax looks there for the step's _CHECKPOINT_METADATA,
    which lives one level up and which reading the arrays does not need."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Metadata file does not exist") and record.args
                    and str(record.args[0]).endswith("_CHECKPOINT_METADATA"))


@contextlib.contextmanager
def _quiet_item_read():
    absl_logger, quiet = logging.getLogger("absl"), _NoStepMetadataWarning()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


def _saved_tree(path: Path) -> Any:
    """The saved state's tree of array metadata (shape, dtype), read from disk."""
    with _quiet_item_read():
        return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree


def read_on_host(directory: str | Path, step: int, item: str = "state") -> Any:
    """A saved state as numpy arrays in this process, with no mesh or devices
    needed: for inspecting a run, or comparing two, from a notebook."""
    path = Path(directory).absolute() / str(step) / item
    if not path.exists():
        raise CheckpointError(f"no checkpoint item {path}")
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _saved_tree(path))
    with _quiet_item_read():
        return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def read_extra(directory: str | Path, step: int) -> dict:
    """The JSON item saved next to the state (orbax's JsonSave writes one file)."""
    path = Path(directory).absolute() / str(step) / "extra" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint step {step} in {directory}: cannot read {path}: {e}") from e
