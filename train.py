"""Trains the model of an ml-collections config; resumes from the newest checkpoint in --workdir.

    python train.py --config=configs/mqar.py:softmax --workdir=/tmp/mqar [--config.a.b=value]

The loop itself is `attnjax.training.loop.run` (also importable here as `train.run`).

    python train.py --config=configs/pod_lm_1b.py --workdir=/tmp/lm1b --compile_topology=v5e:16x16

compiles the train step for a TPU topology on this host instead (compile-only devices, from
`pip install -r requirements-compile.txt`) and prints its per-chip memory, FLOPs and
collectives, the last line one JSON object (`attnjax.training.compile_topology`); it exits
non-zero when the step does not fit in a chip's HBM.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from attnjax.training import compile_topology
from attnjax.training.loop import run

__all__ = ["run"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if _COMPILE_TOPOLOGY.value:
    try:
      report = compile_topology.compile_train_step(_CONFIG.value, _COMPILE_TOPOLOGY.value)
    except compile_topology.DoesNotFitError as e:
      sys.exit(str(e))
    print(report.summary())
    print(json.dumps(report.as_json()))
    return
  os.makedirs(_WORKDIR.value, exist_ok=True)
  print(json.dumps(run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":  # flags only when run as a script, so tests can import run()
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
  _COMPILE_TOPOLOGY = flags.DEFINE_string(
    "compile_topology",
    None,
    "Only compile the train step for this TPU topology (e.g. v5e:16x16, v5p:4x4x8) on "
    "compile-only devices and print its per-chip memory vs HBM, FLOPs per step and "
    "collectives (last line: JSON); nothing is trained and nothing is written to --workdir. "
    "Exits non-zero when the step does not fit in HBM.",
  )
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
