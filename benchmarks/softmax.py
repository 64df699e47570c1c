"""Softmax attention on this machine: `xla` (blockwise) vs `reference` vs jax.nn, time and memory.

    python benchmarks/softmax.py            # T = 1k ... 16k (about 20 minutes on 2 CPU cores)
    python benchmarks/softmax.py --quick    # T = 1k, 2k

For each sequence length, mask (causal, sliding window 512, random blocks at 12.5% density) and
pass (forward, forward+backward) it records the median wall time of repeated runs after a
warm-up and the compiled peak memory (`compiled.memory_analysis()`: arguments + outputs +
temporaries). Dense implementations are only run where their T x T logits fit in memory
(`--dense-max-len`); their memory is still reported from compilation. Results go to
`benchmarks/results/softmax.json` and `softmax.png`, and the figures the Foundation issue asks
for are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj
from attnjax.ops.softmax import BlockSizes

RESULTS = pathlib.Path(__file__).parent / "results"
HEADS, HEAD_DIM, BATCH = 8, 64, 1


def make_mask(name: str, seq_len: int, block: int):
  if name == "causal":
    return aj.masks.causal()
  if name == "window512":
    return aj.masks.sliding_window(511)
  if name == "random12":  # exactly 1/8 of the kv blocks in every row, chosen at random
    n = -(-seq_len // block)
    rng = np.random.default_rng(0)
    bits = np.zeros((n, n), bool)
    for row in bits:
      row[rng.choice(n, size=max(1, n // 8), replace=False)] = True
    return aj.masks.block_pattern(bits, block, block)
  raise ValueError(name)


def jax_nn_kwargs(name: str, mask, seq_len: int):
  if name == "causal":
    return {"is_causal": True}
  if name == "window512":
    return {"is_causal": True, "local_window_size": (511, 0)}
  return {"mask": jnp.asarray(aj.masks.to_dense(mask, seq_len, seq_len))[None, None]}


def build(impl: str, mask_name: str, seq_len: int, block: int):
  mask = make_mask(mask_name, seq_len, block)
  if impl == "jax.nn":
    kwargs = jax_nn_kwargs(mask_name, mask, seq_len)

    def attend(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)

  else:

    def attend(q, k, v):
      return aj.ops.dot_product_attention(
        q, k, v, mask=mask, impl=impl, block_sizes=BlockSizes(block, block)
      )

  def fwd_bwd(q, k, v):
    return jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

  return jax.jit(attend), jax.jit(fwd_bwd)


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def measure(fn, args, repeats: int, run: bool) -> dict:
  compiled = fn.lower(*args).compile()
  result = {"peak_bytes": peak_bytes(compiled)}
  if run:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    result["seconds"] = statistics.median(times)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--lengths", type=int, nargs="*", default=None)
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dense-max-len", type=int, default=8192)
  parser.add_argument("--name", default="softmax", help="results file stem")
  args = parser.parse_args()
  lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384])
  records = []
  for seq_len in lengths:
    keys = jax.random.split(jax.random.PRNGKey(seq_len), 3)
    q, k, v = (jax.random.normal(key, (BATCH, seq_len, HEADS, HEAD_DIM)) for key in keys)
    for mask_name in ("causal", "window512", "random12"):
      for impl in ("xla", "reference", "jax.nn"):
        fwd, fwd_bwd = build(impl, mask_name, seq_len, args.block)
        run = impl == "xla" or seq_len <= args.dense_max_len
        for pass_name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
          record = {"seq_len": seq_len, "mask": mask_name, "impl": impl, "pass": pass_name}
          record.update(measure(fn, (q, k, v), args.repeats, run))
          records.append(record)
          print(json.dumps(record), flush=True)
  RESULTS.mkdir(exist_ok=True)
  meta = {
    "device": str(jax.devices()[0]),
    "heads": HEADS,
    "head_dim": HEAD_DIM,
    "block": args.block,
  }
  (RESULTS / f"{args.name}.json").write_text(
    json.dumps({"meta": meta, "records": records}, indent=1)
  )
  plot(records, RESULTS / f"{args.name}.png")
  summarize(records)


def _lookup(records, **where):
  for r in records:
    if all(r.get(key) == value for key, value in where.items()):
      return r
  return None


def summarize(records) -> None:
  for pass_name in ("fwd", "fwd+bwd"):
    xla = _lookup(records, seq_len=4096, mask="causal", impl="xla", **{"pass": pass_name})
    ref = _lookup(records, seq_len=4096, mask="causal", impl="jax.nn", **{"pass": pass_name})
    if xla and ref and "seconds" in ref:
      ratio = xla["seconds"] / ref["seconds"]
      print(f"T=4096 causal {pass_name}: xla / jax.nn time = {ratio:.2f} (target <= 1.2)")
    sparse = _lookup(records, seq_len=8192, mask="random12", impl="xla", **{"pass": pass_name})
    causal = _lookup(records, seq_len=8192, mask="causal", impl="xla", **{"pass": pass_name})
    if sparse and causal:
      ratio = sparse["seconds"] / causal["seconds"]
      print(f"T=8192 {pass_name}: xla 12.5% blocks / xla causal time = {ratio:.2f} (target <= 0.3)")
    small = _lookup(records, seq_len=4096, mask="causal", impl="xla", **{"pass": pass_name})
    large = _lookup(records, seq_len=16384, mask="causal", impl="xla", **{"pass": pass_name})
    if small and large:
      growth = large["peak_bytes"] / small["peak_bytes"]
      print(
        f"xla causal {pass_name} peak memory 4k -> 16k: x{growth:.2f} (linear: 4, quadratic: 16)"
      )


def plot(records, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  for col, mask_name in enumerate(("causal", "window512", "random12")):
    for impl, style in (("xla", "-o"), ("reference", "--s"), ("jax.nn", ":^")):
      for pass_name, color in (("fwd", "tab:blue"), ("fwd+bwd", "tab:red")):
        rows = [
          r
          for r in records
          if r["mask"] == mask_name and r["impl"] == impl and r["pass"] == pass_name
        ]
        timed = [r for r in rows if "seconds" in r]
        label = f"{impl} {pass_name}"
        axes[0, col].loglog(
          [r["seq_len"] for r in timed], [r["seconds"] for r in timed], style, c=color, label=label
        )
        axes[1, col].loglog(
          [r["seq_len"] for r in rows], [r["peak_bytes"] / 2**20 for r in rows], style, c=color
        )
    axes[0, col].set_title(f"{mask_name}: time (s)")
    axes[1, col].set_title(f"{mask_name}: compiled peak memory (MiB)")
    axes[1, col].set_xlabel("sequence length")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == "__main__":
  main()
