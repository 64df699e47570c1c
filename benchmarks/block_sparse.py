"""Block-sparse Pallas kernel: work skipped per mask, and (on TPU/GPU) time vs jax.nn.

    python benchmarks/block_sparse.py                 # every backend: tile / FLOP table
    python benchmarks/block_sparse.py --time          # TPU/GPU: also time fwd and fwd+bwd

The long-context mask taxonomy (full, causal, sliding window, chunked causal, document
/ varlen, strided, prefix-LM, random 10% blocks) for T = 1k ... 128k. For each mask the
BlockMask at the kernel's tiles gives the visited tiles / all tiles and the FLOPs the kernel
performs relative to dense attention (a visited tile costs a full tile of FLOPs). With
`--time` on TPU or GPU, forward and forward+backward of `impl="pallas"` are timed against
`jax.nn.dot_product_attention` (XLA, and cuDNN on GPU) where the mask is expressible there.
Results: `benchmarks/results/block_sparse.json` and `.png`.
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

RESULTS = pathlib.Path(__file__).parent / "results"
LENGTHS = [1024, 4096, 16384, 65536, 131072]


def taxonomy(seq_len: int, block: int) -> dict:
  """Mask name -> (Mask, jax.nn kwargs or None when jax.nn cannot express it)."""
  n_blocks = -(-seq_len // block)
  rng = np.random.default_rng(seq_len)
  bits = rng.random((n_blocks, n_blocks)) < 0.10
  bits[np.arange(n_blocks), np.arange(n_blocks)] = True
  doc_lengths = rng.integers(seq_len // 16, seq_len // 4, size=32)
  doc_lengths = doc_lengths[np.cumsum(doc_lengths) <= seq_len]
  doc_lengths = np.append(doc_lengths, seq_len - doc_lengths.sum())
  doc_lengths = doc_lengths[doc_lengths > 0]
  causal = aj.masks.causal()
  return {
    "full": (None, {}),
    "causal": (causal, {"is_causal": True}),
    "sliding_window_4k": (aj.masks.sliding_window(4095), {"local_window_size": (4095, 0)}),
    "chunked_causal_8k": (causal & aj.masks.chunked(8192), None),
    "documents_causal": (causal & aj.masks.documents(doc_lengths.tolist()), None),
    "strided_256": (causal & (aj.masks.strided(256) | aj.masks.sliding_window(255)), None),
    "prefix_lm_quarter": (aj.masks.prefix_lm(seq_len // 4), None),
    "random_10pct_blocks": (aj.masks.block_pattern(bits, block, block), None),
  }


def work_record(mask, seq_len: int, block: int) -> dict:
  bm = aj.masks.block_mask(mask, seq_len, seq_len, block, block)
  total = bm.num_q_blocks * bm.num_kv_blocks * bm.mask_heads
  visited = int(bm.kv_counts.sum())
  return {
    "visited_tiles": visited,
    "total_tiles": total,
    "visited_fraction": visited / total,
    # A visited tile costs a whole tile; dense attention costs seq_len**2 per head.
    "flops_vs_dense": visited * block * block / (bm.mask_heads * seq_len**2),
    "distinct_partial_tiles": int(bm.partial_tiles.shape[0]),
  }


def timed(fn, args, repeats=5) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_record(mask, jax_kwargs, seq_len, heads=8, head_dim=128, dtype=jnp.bfloat16) -> dict:
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (1, seq_len, heads, head_dim), dtype) for key in keys)

  def ours(q, k, v):
    return aj.ops.dot_product_attention(q, k, v, mask=mask, impl="pallas")

  impls = {"pallas": ours}
  if jax_kwargs is not None:
    impls["jax.nn.xla"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="xla", **jax_kwargs
    )
    if jax.default_backend() == "gpu":
      impls["jax.nn.cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", **jax_kwargs
      )
  record = {}
  for name, fn in impls.items():

    def fwd_bwd(q, k, v, fn=fn):
      return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    try:
      record[f"{name}_fwd_s"] = timed(fn, (q, k, v))
      record[f"{name}_fwd_bwd_s"] = timed(fwd_bwd, (q, k, v))
    except Exception as e:  # noqa: BLE001 - report what could not run, keep measuring the rest
      record[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
  parser.add_argument("--time", action="store_true", help="time the kernel (TPU/GPU only)")
  args = parser.parse_args()
  if args.time and jax.default_backend() not in ("tpu", "gpu"):
    raise SystemExit("--time needs a TPU or GPU; on CPU this script reports work only")
  records = []
  for seq_len in args.lengths:
    for name, (mask, jax_kwargs) in taxonomy(seq_len, args.block).items():
      record = {"seq_len": seq_len, "mask": name, "block": args.block}
      record.update(work_record(mask, seq_len, args.block))
      if args.time:
        record.update(time_record(mask, jax_kwargs, seq_len))
      records.append(record)
      print(json.dumps(record), flush=True)
  RESULTS.mkdir(exist_ok=True)
  meta = {"backend": jax.default_backend(), "device": str(jax.devices()[0])}
  (RESULTS / "block_sparse.json").write_text(
    json.dumps({"meta": meta, "records": records}, indent=1)
  )
  print_table(records)
  plot(records)


def print_table(records) -> None:
  lengths = sorted({r["seq_len"] for r in records})
  print("\nkernel FLOPs / dense FLOPs")
  print(f"{'mask':22s}" + "".join(f"{'T=' + str(n):>14s}" for n in lengths))
  for name in dict.fromkeys(r["mask"] for r in records):
    row = [r for r in records if r["mask"] == name]
    cells = "".join(f"{r['flops_vs_dense']:>14.3f}" for r in row)
    print(f"{name:22s}{cells}")


def plot(records) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for name in dict.fromkeys(r["mask"] for r in records):
    row = [r for r in records if r["mask"] == name]
    ax.loglog([r["seq_len"] for r in row], [r["flops_vs_dense"] for r in row], "-o", label=name)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("kernel FLOPs / dense FLOPs")
  ax.set_title(f"block-sparse kernel work (tiles of {records[0]['block']})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(RESULTS / "block_sparse.png", dpi=100)


if __name__ == "__main__":
  main()
