"""Checkpoints in ``<workdir>/checkpoints``: an orbax ``CheckpointManager`` of named items.

Each checkpoint (a directory per step, written atomically: a run killed mid-save leaves only
complete checkpoints behind) holds:

- ``state``: the :class:`~jaxpo.train.state.TrainState` (step, params, optimizer state,
  skipped-step count), saved and restored with its shardings (collectively on many hosts);
- ``reference``: the frozen reference params, when they cannot be rebuilt from the config
  (after an SFT warm-up the reference is the warmed-up policy);
- ``data``: the training data iterator's state (JSON);
- ``config``: the run's config (JSON);
- ``meta``: small JSON facts of the run (phase, counters).

Saving is synchronous: when :meth:`Checkpointer.save` returns the checkpoint is on disk.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

JSON_ITEMS = ("data", "config", "meta")


class Checkpointer:
    """Saves and restores checkpoints of a run under ``<workdir>/checkpoints``.

    Args:
      workdir: the run directory.
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, reference: Any = None, data: Any = None,
             config: Any = None, meta: Any = None) -> None:
        """Writes checkpoint ``step`` (replacing nothing: an existing step is left as is)."""
        if step in self.manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state)}
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        for name, value in zip(JSON_ITEMS, (data, config, meta)):
            if value is not None:
                items[name] = ocp.args.JsonSave(value)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def item_names(self, step: int) -> set[str]:
        """The items stored in checkpoint ``step``."""
        path = os.path.join(self.directory, str(step))
        return {n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))}

    def restore(self, step: int, abstract_state: Any, *, abstract_reference: Any = None
                ) -> dict[str, Any]:
        """Restores checkpoint ``step``.

        Args:
          step: the checkpoint's step.
          abstract_state: the state's structure as ``jax.ShapeDtypeStruct`` leaves with
            shardings (where the restored arrays go).
          abstract_reference: likewise for the reference, when the checkpoint has one.

        Returns:
          ``{"state": ..., "reference": ... | None, "data": ..., "config": ..., "meta": ...}``
          (JSON items None when absent).
        """
        names = self.item_names(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if "reference" in names and abstract_reference is not None:
            items["reference"] = ocp.args.StandardRestore(abstract_reference)
        for name in JSON_ITEMS:
            if name in names:
                items[name] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {name: restored.get(name) if name in items else None
                for name in ("state", "reference", *JSON_ITEMS)}

    def read_json(self, step: int, name: str) -> Any:
        """One JSON item of checkpoint ``step`` (None when absent)."""
        if name not in self.item_names(step):
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))
        return restored[name]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree`` (arrays or abstract) with ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
