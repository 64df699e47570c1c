"""Orbax checkpoints of the train state: keep-last-N, restore the newest one that loads.

Orbax writes a step into a temporary directory and renames it when complete, so a run
killed mid-save leaves no step behind. A newest checkpoint that is nevertheless unreadable
(truncated files, a disk error) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import warnings

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `{"params", "opt_state", "step"}` pytrees under `directory`."""

  def __init__(self, directory: str, *, keep: int):
    self.manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
      ),
    )
    self._unreadable: set[int] = set()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    """Saves `state` as `step` and waits until it is complete.

    A readable checkpoint of `step` is kept as is; an unreadable one is replaced.
    """
    if step in self._unreadable:
      self.manager.delete(step)
      self._unreadable.discard(step)
    elif step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(state, step) of the newest readable checkpoint, or (None, None) if there is none.

    `abstract_state` gives the tree structure, shapes, dtypes and target shardings.
    """
    for step in reversed(self.steps()):
      try:
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
        warnings.warn(
          f"checkpoint at step {step} in {self.manager.directory} is unreadable, falling back "
          f"to an earlier one ({type(e).__name__}: {str(e)[:200]})",
          RuntimeWarning,
          stacklevel=2,
        )
        self._unreadable.add(step)
        continue
      return state, step
    return None, None

  def close(self) -> None:
    self.manager.close()
