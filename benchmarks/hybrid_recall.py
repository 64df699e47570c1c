"""MQAR recall of linear-family mixers alone and hybridized with softmax at linear:full ratios.

    python benchmarks/hybrid_recall.py                      # L = 64 and 256, seeds 0 and 1
    python benchmarks/hybrid_recall.py --lengths 64 --seeds 0 --variants gla
    python benchmarks/hybrid_recall.py --lrs 1e-3 3e-3       # best of a learning-rate sweep

The seed paper "A Systematic Analysis of Hybrid Linear Attention" recommends HGRN-2 or Gated
DeltaNet at a linear-to-full ratio between 3:1 and 6:1.
This is its question at CPU scale, on Zoology's MQAR (`configs/mqar.py`: width 64, no MLP,
800 steps of 64 sequences, the preset's options for each variant):

- `<variant>` alone: 2 layers of it;
- `r:1` hybrids: `r` layers of the variant then one softmax layer (depth r + 1), so every
  hybrid has exactly one softmax layer and the ratio sets how many linear layers surround it;
- `softmax`: 2 softmax layers.

Sequence length 64 has 4 key-value pairs (vocabulary 256), 256 has 16 (vocabulary 512, which
must exceed the length), as in Zoology's sweep. The score is the final eval accuracy over
1,024 held-out answers (the `mqar_accuracy` evaluator). With `--lrs`, every arm and seed is
trained at each learning rate and scored by its best, as Zoology sweeps learning rates per
model (default: the config's 3e-3 only). Runs already in the results file are skipped, so an
interrupted study resumes. Results: `benchmarks/results/hybrid_recall.json`,
a plot of recall against ratio (`hybrid_recall.png`) and a markdown table (`hybrid_recall.md`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnjax.training.loop import run  # noqa: E402
from configs import mqar  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("gated_deltanet", "hgrn2", "gla", "based", "linear")
RATIOS = (1, 3, 6)
DEFAULT_LR = 3e-3  # configs/mqar.py
# Zoology's (pairs, vocabulary) per length; the vocabulary must exceed the length.
TASKS = {64: (4, 256), 128: (8, 256), 256: (16, 512)}


def arms(variants, ratios) -> list[tuple[str, str, int]]:
  """(name, layer_pattern, depth) of every model of the study."""
  out = [("softmax", "softmax", 2)]
  for variant in variants:
    out.append((variant, variant, 2))
    out += [(f"{variant} {r}:1", f"{variant}*{r},softmax", r + 1) for r in ratios]
  return out


def config_for(variant: str, pattern: str, depth: int, seq_len: int, seed: int, lr: float):
  config = mqar.get_config(variant)
  config.train.learning_rate = lr
  num_pairs, vocab = TASKS[seq_len]
  config.model.layer_pattern = pattern
  config.model.depth = depth
  config.model.vocab_size = vocab
  config.data.mqar.seq_len = seq_len
  config.data.mqar.num_pairs = num_pairs
  config.data.mqar.vocab_size = vocab
  config.seed = seed
  return config


def learning_rate(run: dict) -> float:
  return run.get("learning_rate", DEFAULT_LR)  # runs before the sweep used the config's


def best_per_seed(runs: list[dict]) -> list[dict]:
  """One record per (arm, length): `accuracies` per seed, each the best over learning rates,
  and `learning_rates` the ones tried."""
  best: dict[tuple, dict] = {}
  for r in runs:
    key = (r["name"], r["seq_len"], r["seed"])
    if key not in best or r["accuracy"] > best[key]["accuracy"]:
      best[key] = r
  grouped: dict[tuple, dict] = {}
  for (name, seq_len, _), r in sorted(best.items(), key=lambda item: item[0]):
    entry = grouped.setdefault((name, seq_len), {**r, "accuracies": []})
    entry["accuracies"].append(r["accuracy"])
    lrs = {learning_rate(x) for x in runs if (x["name"], x["seq_len"]) == (name, seq_len)}
    entry["learning_rates"] = sorted(lrs)
  return list(grouped.values())


def _ratio_order(ratio: str) -> int:
  """Sort key: "all" (softmax) first, then "alone", then r:1 by r."""
  order = {"all": -1, "alone": 0}
  return order[ratio] if ratio in order else int(ratio.split(":")[0])


def plot(records: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lengths = sorted({r["seq_len"] for r in records})
  fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
  for ax, seq_len in zip(axes[0], lengths, strict=True):
    rows = [r for r in records if r["seq_len"] == seq_len]
    for variant in sorted({r["variant"] for r in rows} - {"softmax"}):
      points = sorted(
        (_ratio_order(r["ratio"]), r["ratio"], statistics.mean(r["accuracies"]))
        for r in rows
        if r["variant"] == variant
      )
      ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label=variant)
    softmax = [statistics.mean(r["accuracies"]) for r in rows if r["variant"] == "softmax"]
    if softmax:
      ax.axhline(softmax[0], color="black", ls="--", label="softmax x2")
    ax.set(title=f"MQAR L={seq_len}", xlabel="linear : full layers", ylabel="recall accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def markdown(records: list[dict]) -> str:
  lines = [
    "| L | model | layer_pattern | depth | learning rates | accuracy per seed (best lr) | mean |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in sorted(records, key=lambda r: (r["seq_len"], r["variant"], _ratio_order(r["ratio"]))):
    accs = ", ".join(f"{a:.3f}" for a in r["accuracies"])
    lines.append(
      f"| {r['seq_len']} | {r['name']} | `{r['pattern']}` | {r['depth']} | "
      f"{', '.join(f'{lr:g}' for lr in r['learning_rates'])} | {accs} "
      f"| {statistics.mean(r['accuracies']):.3f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="*", default=[64, 256])
  parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--ratios", type=int, nargs="*", default=list(RATIOS))
  parser.add_argument("--lrs", type=float, nargs="*", default=[DEFAULT_LR])
  parser.add_argument("--out", default="hybrid_recall", help="file stem under results/")
  args = parser.parse_args()
  path = RESULTS / f"{args.out}.json"
  done = json.loads(path.read_text())["runs"] if path.exists() else []
  seen = {(r["name"], r["seq_len"], r["seed"], learning_rate(r)) for r in done}
  for seq_len in args.lengths:
    for name, pattern, depth in arms(args.variants.split(","), args.ratios):
      for seed, lr in itertools.product(args.seeds, args.lrs):
        if (name, seq_len, seed, lr) in seen:
          continue
        variant = name.split()[0]
        config = config_for(variant, pattern, depth, seq_len, seed, lr)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
          summary = run(config, workdir)
        ratio = name.split()[1] if " " in name else ("all" if variant == "softmax" else "alone")
        done.append({
          "name": name, "variant": variant, "ratio": ratio, "pattern": pattern, "depth": depth,
          "seq_len": seq_len, "seed": seed, "learning_rate": lr,
          "accuracy": summary["eval"]["accuracy"],
          "loss": summary["eval"]["loss"], "wall_s": time.perf_counter() - start,
        })  # fmt: skip
        print(json.dumps(done[-1]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps({"runs": done}, indent=1) + "\n")
  records = best_per_seed(done)
  plot(records, RESULTS / f"{args.out}.png")
  table = markdown(records)
  (RESULTS / f"{args.out}.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
