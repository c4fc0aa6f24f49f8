"""Checkpoints of the sharded train state on top of orbax's CheckpointManager.

A checkpoint holds the train state (params, optimizer state, step) as sharded
arrays plus a small JSON item (data iterator state and anything else the
trainer wants back). Restores go onto whatever shardings the caller's abstract
state names, so a run may resume on a different mesh. The full async design
(lazy snapshots, universal restore checks) is its own issue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be restored as asked."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Starts a save; returns once the device arrays are safe to donate."""
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` onto the shardings named by `abstract_state` (ShapeDtypeStructs)."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored into this run's state "
                f"(different model or optimizer config?): {e}"
            ) from e
        return restored.state, restored.extra

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def read_on_host(directory: str | Path, step: int, item: str = "state") -> Any:
    """A saved state as numpy arrays in this process, with no mesh or devices
    needed: for inspecting a run, or comparing two, from a notebook."""
    path = Path(directory).absolute() / str(step) / item
    if not path.exists():
        raise CheckpointError(f"no checkpoint item {path}")
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
