"""Trains the model of an ml-collections config; resumes from the newest checkpoint in --workdir.

    python train.py --config=configs/mqar.py:softmax --workdir=/tmp/mqar [--config.a.b=value]

The loop itself is `attnjax.training.loop.run` (also importable here as `train.run`).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from attnjax.training.loop import run

__all__ = ["run"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  os.makedirs(_WORKDIR.value, exist_ok=True)
  print(json.dumps(run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":  # flags only when run as a script, so tests can import run()
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
