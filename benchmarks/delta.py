"""The delta rule on this machine: the chunked xla form against the token-by-token reference
scan, forward and forward+backward, and the chunked form's FLOP rate against this machine's
float32 matmul rate measured in the same run.

    python benchmarks/delta.py                       # T = 16,384, heads 8, head_dim 64
    python benchmarks/delta.py --seq 4096 --repeats 1

Inputs: batch 1, L2-normalized keys, beta in (0, 1), Gated DeltaNet's decay (`--no-decay`:
DeltaNet). FLOPs are XLA's `cost_analysis` of the compiled call. Each time is the median of
`--repeats` runs after a warm-up. Results go to `benchmarks/results/delta.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

import attnjax as aj

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from linear import flops, matmul_rate, seconds  # noqa: E402  (shared timer and rates)

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=16384)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--chunk-size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-decay", action="store_true")
  parser.add_argument("--out", default="delta", help="file stem under benchmarks/results/")
  args = parser.parse_args()

  shape = (1, args.seq, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(key, shape) for key in keys[:3])
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(keys[3], shape[:3]))
  log_decay = (
    None if args.no_decay else jax.nn.log_sigmoid(3 + jax.random.normal(keys[4], shape[:3]))
  )
  inputs = (q, k, v, beta)

  def attend(impl):
    def run(q, k, v, beta):
      return aj.ops.delta_rule_attention(
        q, k, v, beta, log_decay=log_decay, chunk_size=args.chunk_size, impl=impl
      )

    return run

  def grad(fn):
    return jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2, 3))

  records = {"matmul_flops_per_s": matmul_rate(args.repeats)}
  for impl in ("reference", "xla"):
    for mode, fn in (("forward", attend(impl)), ("forward_backward", grad(attend(impl)))):
      t = seconds(jax.jit(fn), inputs, args.repeats)
      records[f"{impl}_{mode}_s"] = t
      if impl == "xla":  # XLA counts a scan's body once, so the reference has no true count
        records[f"xla_{mode}_flops_per_s"] = flops(fn, inputs) / t
      print(f"{impl:9s} {mode:16s} {t * 1e3:9.1f} ms", flush=True)
  for mode in ("forward", "forward_backward"):
    ratio = records[f"xla_{mode}_s"] / records[f"reference_{mode}_s"]
    rate = records[f"xla_{mode}_flops_per_s"] / records["matmul_flops_per_s"]
    records[f"xla_over_reference_{mode}"] = ratio
    print(f"{mode}: xla / reference time {ratio:.2f}; xla FLOP rate {rate:.1%} of matmul peak")
  meta = {**vars(args), "jax": jax.__version__, "cpus": os.cpu_count()}
  path = RESULTS / f"{args.out}.json"
  path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
