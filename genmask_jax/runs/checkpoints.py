"""A run's training checkpoints with Orbax: train state, per-process data-iterator state, config.

Training saves and resumes them; evaluation and inference restore only the trained parameters
(runs/model.py).

Saves are asynchronous and atomic (Orbax finalizes a step only once every process wrote its
shards), so a run killed at any moment restarts from the last complete step.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

from genmask_jax.runtime import fileio


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restores into the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs)."""
  return ocp.args.PyTreeRestore(
    abstract,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
    partial_restore=partial,
  )


class TrainCheckpoints:
  """The checkpoints of one training run under `directory`."""

  def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
      fileio.absolute(directory),
      item_handlers={
        "state": ocp.PyTreeCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=every,
        create=True,
        enable_async_checkpointing=async_save,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def is_save_step(self, step: int) -> bool:
    """Whether `save(step, ...)` would save without `force`."""
    return self.manager.should_save(step)

  def save(
    self,
    step: int,
    state: Any,
    data_iterator: Any,
    config: ml_collections.ConfigDict,
    force: bool = False,
  ) -> bool:
    """Saves at `step` if it is a save step (or `force`); returns whether it saved."""
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict()),
      ),
      force=force,
    )

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The train state at `step`, in the shardings of `abstract_state`; rewinds `data_iterator`."""
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=_restore_args(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
      )
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      raise ValueError(
        f"{self.manager.directory}/{step}: the saved train state does not have the layout this "
        "config makes (a different model, optimizer or segmentation loss?); resume with the "
        f"config it was trained with, or start a new workdir. Orbax: {e}"
      ) from e
    return restored.state

  def restore_params(self, step: int, abstract_params: Any, item: str = "params") -> Any:
    """Only the trained parameters at `step` (for evaluation and inference): the train state's
    `params`, or its `ema_params` (their moving average) when the run kept one."""
    saved = self.manager.item_metadata(step)["state"]
    if saved.get(item) is None:
      raise ValueError(
        f"{self.manager.directory}/{step}: the train state holds no {item!r} "
        "(config.optimizer.ema_decay > 0 asks for the weights' moving average, which only a run "
        "trained with it keeps)"
      )
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=_restore_args({item: abstract_params}, partial=True))
    )
    return restored.state[item]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
