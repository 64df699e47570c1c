"""Evaluates the newest checkpoint in --workdir with the evaluators its config names.

    python eval.py --workdir=/tmp/mqar [--config=configs/mqar.py:softmax --config.a.b=v]

Without --config the run's own `workdir/config.json` is used. Writes `workdir/eval.json` and
`workdir/eval.png` (curves: passkey accuracy by length, loss by position).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from attnjax.training import checkpoint, distributed, evaluate
from attnjax.training import config as config_lib


def run(config, workdir: str) -> dict:
  """Runs `config.eval.evaluators` on the newest readable checkpoint; returns the results.

  `config` None: the one the run saved (`workdir/config.json`).
  """
  config = config_lib.load(workdir) if config is None else config
  config_lib.validate(config)
  distributed.maybe_initialize(config.distributed)
  restored = checkpoint.restore(workdir, config)
  results = {"step": restored.step}
  for name in config.eval.evaluators:
    results[name] = evaluate.EVALUATORS[name](restored.experiment, restored.params)
    if jax.process_index() == 0:
      print(f"{name}: {json.dumps(results[name])}")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(results, f, indent=2)
    plot(results, os.path.join(workdir, "eval.png"))
  return results


def plot(results: dict, path: str) -> None:
  """One panel per curve in `results`; scalar metrics in the title."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  curves = {
    k: v for k, v in results.items() if isinstance(v, dict) and ("position" in v or "seq_len" in v)
  }
  scalars = [f"{k}/{m}={v:.3f}" for k, r in results.items() if isinstance(r, dict)
             for m, v in r.items() if isinstance(v, float)]  # fmt: skip
  fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(5 * max(len(curves), 1), 3.5))
  for ax, (name, curve) in zip(fig.axes, curves.items(), strict=False):
    if "position" in curve:
      for key in (k for k in curve if k == "loss" or k.startswith("loss_")):
        ax.plot(curve["position"], curve[key], marker=".", label=key.removeprefix("loss_"))
      ax.axvline(curve["train_seq_len"], color="gray", linestyle="--", label="training length")
      ax.set(xlabel="position", ylabel="loss (nats)", title=name)
      ax.legend()
    else:
      ax.plot(curve["seq_len"], curve["accuracy"], marker="o")
      ax.set(xlabel="context length", ylabel="accuracy", ylim=(0, 1.05), title=name, xscale="log")
  fig.suptitle(f"step {results['step']}  " + "  ".join(scalars), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":  # flags only when run as a script, so tests can import run()
  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:preset] (default: run's)."
  )
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the training run.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
