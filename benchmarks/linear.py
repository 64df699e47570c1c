"""Linear attention on this machine: tokens/s of xla (chunked) and reference (recurrent) linear
attention against xla causal softmax, with batch x T fixed, forward and forward+backward.

    python benchmarks/linear.py           # T = 1k ... 64k, 64k tokens per call
    python benchmarks/linear.py --quick   # T = 1k, 4k, 16k tokens per call
    python benchmarks/linear.py --versus-scan   # chunked xla vs the token scan, per decay kind

On TPU and GPU the Pallas kernel (`linear_pallas`: impl="pallas", which picks the Mosaic
kernel on TPU and the Triton kernel on GPU) is timed too; pass `--impls` to choose.

Linear attention here has a data-dependent scalar decay (the Lightning / Mamba-2 kind),
identity features, chunk 64. Softmax is `dot_product_attention(..., mask=causal(),
impl="xla")`, run up to `--softmax-max-len` (its cost grows with T). Each figure is the median
wall time of `--repeats` runs after a warm-up. Results go to `benchmarks/results/linear.json`
and `linear.png`; the issue's figures (time per token T=64k / T=4k for xla linear, speedup of
xla linear over xla softmax at T=16k) are printed at the end.

`--versus-scan` times, at T = 16,384, 8 heads x 64, batch 1, the chunked xla form against the
token-by-token reference scan forward for each decay kind (none, per head, per channel: GLA),
and puts the chunked form's FLOP rate (XLA's count of the compiled call) next to two matmul
rates of this machine measured in the same run: one 1024-cubed matmul, and the batched
`[b*h*n, C, d] x [b*h*n, d, d]` matmul of the chunk shapes the chunked form is made of.
Results: `benchmarks/results/linear_vs_scan.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj

RESULTS = pathlib.Path(__file__).parent / "results"


def build(impl: str, chunk_size: int):
  """(forward, forward+backward), jitted, of one implementation on (q, k, v, log_decay)."""
  if impl == "softmax_xla":

    def attend(q, k, v, log_decay):
      del log_decay
      return aj.ops.dot_product_attention(q, k, v, mask=aj.masks.causal(), impl="xla")

  else:
    linear_impl = impl.removeprefix("linear_")

    def attend(q, k, v, log_decay):
      return aj.ops.linear_attention(
        q, k, v, log_decay=log_decay, chunk_size=chunk_size, impl=linear_impl
      )

  def loss(q, k, v, log_decay):
    return attend(q, k, v, log_decay).astype(jnp.float32).sum()

  return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def flops(fn, args) -> float:
  """XLA's FLOP count of the compiled `fn(*args)` (a scan's body is counted once)."""
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def matmul_rate(repeats: int, size: int = 1024) -> float:
  """float32 FLOP/s of one `size`-cubed matmul on this machine."""
  a = jax.random.normal(jax.random.key(0), (size, size))
  return 2 * size**3 / seconds(jax.jit(lambda a: a @ a), (a,), repeats)


def batched_matmul_rate(repeats: int, batch: int, rows: int, dim: int) -> float:
  """float32 FLOP/s of `[batch, rows, dim] x [batch, dim, dim]` (the chunked form's shapes)."""
  a = jax.random.normal(jax.random.key(1), (batch, rows, dim))
  b = jax.random.normal(jax.random.key(2), (batch, dim, dim))
  fn = jax.jit(lambda a, b: jnp.einsum("bcd,bde->bce", a, b))
  return 2 * batch * rows * dim * dim / seconds(fn, (a, b), repeats)


def versus_scan(args) -> None:
  """The chunked xla form against the token-by-token scan at T = 16,384 (see the docstring)."""
  seq, heads, dim, chunk = 16384, 8, 64, args.chunk_size
  rng = np.random.default_rng(0)
  shape = (1, seq, heads, dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  decays = {
    "none": None,
    "per_head": jnp.asarray(-rng.uniform(0.0, 0.1, shape[:3]), jnp.float32),
    "per_channel": jnp.asarray(-rng.uniform(0.0, 0.1, shape), jnp.float32),
  }
  records = {
    "matmul_flops_per_s": matmul_rate(args.repeats),
    "chunk_batched_matmul_flops_per_s": batched_matmul_rate(
      args.repeats, heads * seq // chunk, chunk, dim
    ),
  }
  for kind, log_decay in decays.items():
    times = {}
    args_of_kind = (q, k, v) if log_decay is None else (q, k, v, log_decay)
    for impl in ("reference", "xla"):

      def attend(q, k, v, log_decay=None, impl=impl):
        return aj.ops.linear_attention(q, k, v, log_decay=log_decay, chunk_size=chunk, impl=impl)

      times[impl] = seconds(jax.jit(attend), args_of_kind, args.repeats)
      if impl == "xla":
        records[f"{kind}_xla_flops_per_s"] = flops(attend, args_of_kind) / times[impl]
    records.update({f"{kind}_{impl}_s": t for impl, t in times.items()})
    records[f"{kind}_xla_over_reference"] = times["xla"] / times["reference"]
    print(
      f"decay {kind:11s}: reference {times['reference'] * 1e3:7.1f} ms, xla "
      f"{times['xla'] * 1e3:7.1f} ms ({times['xla'] / times['reference']:.2f}x); xla FLOP rate "
      f"{records[f'{kind}_xla_flops_per_s'] / 1e9:.1f} GFLOP/s",
      flush=True,
    )
  print(
    f"matmul 1024^3: {records['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; batched chunk matmul "
    f"[{heads * seq // chunk}, {chunk}, {dim}] x [{dim}, {dim}]: "
    f"{records['chunk_batched_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"
  )
  meta = {"seq_len": seq, "heads": heads, "head_dim": dim, "chunk_size": chunk,
          "repeats": args.repeats, "jax": jax.__version__, "cpus": os.cpu_count()}  # fmt: skip
  path = RESULTS / "linear_vs_scan.json"
  path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
  print(f"wrote {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="T = 1k, 4k with 16k tokens")
  parser.add_argument("--lengths", type=int, nargs="*", default=None)
  parser.add_argument("--tokens", type=int, default=None, help="batch x T per call")
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--chunk-size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  default_impls = ["linear_xla", "linear_reference", "softmax_xla"]
  if jax.default_backend() in ("tpu", "gpu"):
    default_impls.insert(0, "linear_pallas")
  parser.add_argument("--impls", nargs="*", default=default_impls)
  parser.add_argument("--softmax-max-len", type=int, default=16384)
  parser.add_argument("--out", default="linear", help="file stem under benchmarks/results/")
  parser.add_argument("--versus-scan", action="store_true", help="see the module docstring")
  args = parser.parse_args()
  if args.versus_scan:
    versus_scan(args)
    return
  lengths = args.lengths or ([1024, 4096] if args.quick else [1024 * 2**i for i in range(7)])
  tokens = args.tokens or (16384 if args.quick else 65536)
  records = []
  for seq_len in lengths:
    batch = tokens // seq_len
    if batch < 1:
      raise SystemExit(f"--tokens={tokens} is smaller than T={seq_len}")
    rng = np.random.default_rng(seq_len)
    shape = (batch, seq_len, args.heads, args.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    log_decay = jnp.asarray(-rng.uniform(0.0, 0.1, shape[:3]), jnp.float32)
    for impl in args.impls:
      if impl == "softmax_xla" and seq_len > args.softmax_max_len:
        continue
      fwd, fwd_bwd = build(impl, args.chunk_size)
      for pass_name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        elapsed = seconds(fn, (q, k, v, log_decay), args.repeats)
        record = {
          "seq_len": seq_len,
          "batch": batch,
          "impl": impl,
          "pass": pass_name,
          "seconds": elapsed,
          "tokens_per_s": batch * seq_len / elapsed,
        }
        records.append(record)
        print(json.dumps(record), flush=True)
  RESULTS.mkdir(exist_ok=True)
  meta = {
    "device": str(jax.devices()[0]),
    "cpu_count": os.cpu_count(),
    "tokens": tokens,
    "heads": args.heads,
    "head_dim": args.head_dim,
    "chunk_size": args.chunk_size,
    "repeats": args.repeats,
  }
  path = RESULTS / f"{args.out}.json"
  path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
  plot(records, RESULTS / f"{args.out}.png", meta)
  summarize(records)


def _lookup(records, **where):
  for record in records:
    if all(record.get(key) == value for key, value in where.items()):
      return record
  return None


def summarize(records) -> None:
  for pass_name in ("fwd", "fwd+bwd"):
    where = {"impl": "linear_xla", "pass": pass_name}
    short, long = _lookup(records, seq_len=4096, **where), _lookup(records, seq_len=65536, **where)
    if short and long:
      ratio = short["tokens_per_s"] / long["tokens_per_s"]
      print(f"xla linear {pass_name}: time per token T=64k / T=4k = {ratio:.2f} (target <= 1.2)")
    linear = _lookup(records, seq_len=16384, **where)
    softmax = _lookup(records, seq_len=16384, impl="softmax_xla", **{"pass": pass_name})
    if linear and softmax:
      speedup = linear["tokens_per_s"] / softmax["tokens_per_s"]
      print(f"T=16k {pass_name}: xla linear is {speedup:.1f}x faster than xla causal softmax")


def plot(records, path: pathlib.Path, meta) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, pass_name in zip(axes, ("fwd", "fwd+bwd"), strict=True):
    for impl in sorted({r["impl"] for r in records}):
      rows = [r for r in records if r["impl"] == impl and r["pass"] == pass_name]
      ax.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=pass_name)
    ax.set_xticks([r["seq_len"] for r in records if r["impl"] == "linear_xla"][::2])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("tokens / s")
  axes[0].legend()
  fig.suptitle(
    f"linear vs softmax attention, {meta['tokens']} tokens per call, {meta['heads']} heads x "
    f"{meta['head_dim']}, {meta['device']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
