"""Checkpoints in ``<workdir>/checkpoints``: an orbax ``CheckpointManager`` of named items.

Each checkpoint (a directory per step, written atomically: a run killed mid-save leaves only
complete checkpoints behind) holds:

- ``params``: the policy parameters, saved and restored with their shardings (collectively on
  many hosts); a run can start from another run's params (``model.init_from``); with LoRA
  only the adapters (the frozen base stays where it was loaded from, and a resumed run loads
  it again from the same config);
- ``optimizer``: the rest of the :class:`~jaxpo.train.state.TrainState` (update count,
  optimiser state, running statistics);
- ``data``: the training data iterator's state (JSON, written once): the iterator yields the
  same global batches on every process, whatever their number, so a checkpoint written by
  two processes resumes on one and the reverse, continuing the same data sequence;
- ``config``: the run's config (JSON);
- ``meta``: small JSON facts of the run (counters).

Saving is asynchronous: :meth:`Checkpointer.save` returns once the arrays are copied off the
devices and the data iterator's position is taken, and the files are written in the background
while training goes on. :meth:`Checkpointer.close` (and the next save) wait for it. A checkpoint
appears (atomically) only when complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxpo.train.state import TrainState

JSON_ITEMS = ("config", "meta")


class LegacyCheckpointError(ValueError):
    """A complete checkpoint in a format this version cannot continue (not a corrupt one)."""


class Checkpointer:
    """Saves and restores checkpoints of a run under ``<workdir>/checkpoints``.

    Args:
      workdir: the run directory.
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def has(self, step: int) -> bool:
        """Whether checkpoint ``step`` exists (once any save in flight has finished)."""
        self.manager.wait_until_finished()
        return step in self.manager.all_steps()

    def save(self, step: int, state: TrainState, *, data: Any = None, config: Any = None,
             meta: Any = None) -> None:
        """Writes checkpoint ``step``.

        Args:
          step: the checkpoint's step (the state's update count).
          state: the train state.
          data: the training data iterator (its state is saved), or None.
          config, meta: JSON-able dicts, or None.

        Raises:
          ValueError: a checkpoint of this step exists already (never skipped silently).
        """
        if self.has(step):  # (after any save in flight: one save at a time)
            raise ValueError(f"{self.directory}/{step} exists already; a run never overwrites "
                             "a checkpoint")
        items = {"params": ocp.args.StandardSave(state.params),
                 "optimizer": ocp.args.StandardSave(_optimizer_part(state))}
        if data is not None:  # the position now, not when the background write runs
            items["data"] = ocp.args.JsonSave(data.get_state())
        for name, value in zip(JSON_ITEMS, (config, meta)):
            if value is not None:
                items[name] = ocp.args.JsonSave(value)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def item_names(self, step: int) -> set[str]:
        """The items stored in checkpoint ``step``."""
        path = os.path.join(self.directory, str(step))
        return {n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))}

    def restore(self, step: int, abstract_state: TrainState, *, data: Any = None) -> TrainState:
        """Restores the train state of checkpoint ``step`` (and, given the iterator, its data
        position).

        Args:
          step: the checkpoint's step.
          abstract_state: the state's structure as ``jax.ShapeDtypeStruct`` leaves with
            shardings (where the restored arrays go).
          data: the training data iterator, set to the saved position; None leaves it.
        """
        self.manager.wait_until_finished()
        items = {"params": ocp.args.StandardRestore(abstract_state.params),
                 "optimizer": ocp.args.StandardRestore(_optimizer_part(abstract_state))}
        legacy = None
        if data is not None:
            if "data" not in self.item_names(step):
                raise ValueError(f"{self.directory}/{step} has no data iterator state")
            legacy = self._legacy_data_state(step)
            if legacy is None:
                items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data is not None:
            data.set_state(restored["data"] if legacy is None else legacy)
        rest = restored["optimizer"]
        return TrainState(step=rest["step"], params=restored["params"],
                          opt_state=rest["opt_state"], stats=rest["stats"])

    def _legacy_data_state(self, step: int) -> dict[str, Any] | None:
        """The data state of a checkpoint written by jaxpo before the data state became one
        JSON item (``data/process_<p>-of-<P>.json``, one per process), else None. One
        process's state is the global one; several processes each held a shard's position,
        which the global batch order cannot continue: :class:`LegacyCheckpointError`."""
        folder = os.path.join(self.directory, str(step), "data")
        names = sorted(n for n in os.listdir(folder)
                       if n.startswith("process_") and n.endswith(".json"))
        if not names:
            return None
        if names != ["process_0-of-1.json"]:
            raise LegacyCheckpointError(
                f"{self.directory}/{step}: its data position was saved per process by an older "
                f"jaxpo ({', '.join(names)}), and the data order is now the same for any number "
                "of processes, so that position cannot be continued. Start the run anew from "
                f"its weights with --config.model.init_from={os.path.dirname(self.directory)} "
                "in a new --workdir (the data order restarts), or resume it with the jaxpo "
                "version that wrote it")
        with open(os.path.join(folder, names[0]), encoding="utf-8") as f:
            return json.load(f)

    def restore_params(self, step: int, abstract_params: Any, *, strict: bool = True) -> Any:
        """Only the policy params of checkpoint ``step`` (e.g. to start another run);
        ``strict=False`` restores the part of them that ``abstract_params`` names."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params, strict=strict)))
        return restored["params"]

    def set_aside(self, step: int) -> str:
        """Moves checkpoint ``step`` (unreadable) to ``<workdir>/corrupt_checkpoints/<step>``,
        kept for inspection, so that the run can save that step again. Returns the new path."""
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        target = os.path.join(aside, str(step))
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            n = 1
            while os.path.exists(target):
                n += 1
                target = os.path.join(aside, f"{step}-{n}")
            os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

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


def _optimizer_part(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "stats": state.stats}


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree`` (arrays or abstract) with ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
