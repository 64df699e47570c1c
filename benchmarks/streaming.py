"""StreamingLLM on a trained text model: loss by position past the training length when the
cache keeps every position, only a recent window, or attention sinks plus a window.

    python train.py --config=configs/text_lm.py --workdir=/tmp/text_lm    # ~12 min on 2 CPUs
    python benchmarks/streaming.py --workdir=/tmp/text_lm

Xiao et al. 2024 ("Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453)
report that a window-only cache collapses once the first tokens leave it, and that keeping 4
sink tokens recovers the model. Here the run's held-out streams (`eval.extrapolation_factor`
x its training length, one text each) are decoded from the cache in 64-token chunks under the
`cache_policies` evaluator of `attnjax.training.evaluate`: `full` (every position, rotary
positions beyond training), `window` (the last `train_len` positions) and `streaming` (4 sinks +
the last `train_len - 4`, positions within the cache). Results:
`benchmarks/results/streaming.json` and `streaming.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnjax.training import checkpoint, evaluate  # noqa: E402
from attnjax.training import config as config_lib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name in ("full", "window", "streaming"):
    rows = result[f"cache_rows_{name}"]
    label = f"{name} ({rows} rows): {result[f'beyond_{name}']:.3f} past training"
    ax.plot(result["position"], result[f"loss_{name}"], marker=".", label=label)
  ax.axvline(result["train_seq_len"], color="gray", linestyle="--", label="training length")
  ax.set(xlabel="position", ylabel="loss (nats/byte)", title="cache policies, text_lm")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished text run")
  args = parser.parse_args()
  config = config_lib.load(args.workdir)
  restored = checkpoint.restore(args.workdir, config)
  result = evaluate.eval_cache_policies(restored.experiment, restored.params)
  result["step"] = restored.step
  result["layer_pattern"] = config.model.layer_pattern
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "streaming.json").write_text(json.dumps(result, indent=1) + "\n")
  plot(result, RESULTS / "streaming.png")
  for name in ("full", "window", "streaming"):
    print(f"{name:10s} loss past the training length: {result[f'beyond_{name}']:.3f} nats/byte")


if __name__ == "__main__":
  main()
