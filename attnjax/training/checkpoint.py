"""Orbax checkpoints of the train state: keep-last-N, restore the newest one that loads, and
`restore(workdir)`, the trained model of a finished or running run (for eval.py and analysis).

Orbax writes a step into a temporary directory and renames it when complete, so a run
killed mid-save leaves no step behind. A newest checkpoint that is nevertheless unreadable
(truncated files, a disk error) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from attnjax.training import build
from attnjax.training import config as config_lib


class Checkpointer:
  """Saves and restores `{"params", "opt_state", "step"}` pytrees under `directory`."""

  def __init__(self, directory: str, *, keep: int | None = None):
    """`keep`: how many checkpoints saving leaves (None: all of them)."""
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


@dataclasses.dataclass(frozen=True)
class Restored:
  """A run's newest readable checkpoint: its experiment, parameters, step and model."""

  experiment: build.Experiment
  params: Any  # pure dict, sharded like `experiment.abstract_state["params"]`
  step: int
  model: nnx.Module  # `experiment.model(params)`


def restore(workdir: str, config: ml_collections.ConfigDict | None = None) -> Restored:
  """The newest readable checkpoint of the run in `workdir`, on the mesh of `config`.

  `config` None: the one the run saved (`workdir/config.json`). For analysis,
  `model = restore(workdir).model`; raises `FileNotFoundError` when `workdir` holds no
  checkpoint.
  """
  config = config_lib.load(workdir) if config is None else config
  config_lib.validate(config)
  exp = build.experiment(config)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, step = ckpt.restore_latest(exp.abstract_state)
  finally:
    ckpt.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints to restore")
  return Restored(exp, state["params"], step, exp.model(state["params"]))
