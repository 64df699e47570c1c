"""2-D neighborhood attention on this machine: tiled `xla` (and, on TPU or GPU, the fused `pallas`
kernel: Mosaic on TPU, Triton on GPU) vs dense masked `reference`.

    python benchmarks/neighborhood.py            # 64x64 and 128x128 maps (about 10 minutes, 2 CPUs)
    python benchmarks/neighborhood.py --quick    # 64x64, kernel 7 only

For every feature map size, kernel size (7x7, 13x13), dilation (1, 2) and pass (forward,
forward+backward) it records the median wall time of repeated runs after a warm-up and the
compiled peak memory (`compiled.memory_analysis()`: arguments + outputs + temporaries), plus
the fraction of key tiles each tiled plan visits (for `pallas`, the plan of the kernel's own
tiles). A compiled program whose peak memory exceeds `--max-run-gib` is not run (its memory is
still reported). Results go to `benchmarks/results/neighborhood.json` and `neighborhood.png`;
the speedups of xla (and pallas) over dense at 128x128, 7x7 are printed at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax

from attnjax.ops.neighborhood import BlockSizes, neighborhood_attention, pallas, window

RESULTS = pathlib.Path(__file__).parent / "results"
BATCH, HEADS, HEAD_DIM = 1, 2, 32


def build(impl: str, kernel_size: int, dilation: int, tile: int):
  attend = functools.partial(
    neighborhood_attention,
    kernel_size=kernel_size,
    dilation=dilation,
    impl=impl,
    block_sizes=BlockSizes((tile, tile)) if impl == "xla" else None,
  )

  def fwd_bwd(q, k, v):
    return jax.grad(lambda q, k, v: attend(q, k, v).sum(), (0, 1, 2))(q, k, v)

  return jax.jit(attend), jax.jit(fwd_bwd)


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def measure(fn, args, repeats: int, max_run_bytes: int) -> dict:
  compiled = fn.lower(*args).compile()
  result = {"peak_bytes": peak_bytes(compiled)}
  if result["peak_bytes"] <= max_run_bytes:
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
  parser.add_argument("--sizes", type=int, nargs="*", default=None)
  parser.add_argument("--tile", type=int, default=8, help="xla tile edge (tiles are square)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max-run-gib", type=float, default=8.0)
  args = parser.parse_args()
  sizes = args.sizes or ([64] if args.quick else [64, 128])
  kernel_sizes = [7] if args.quick else [7, 13]
  max_run_bytes = int(args.max_run_gib * 2**30)
  records = []
  backend = jax.default_backend()
  for size in sizes:
    keys = jax.random.split(jax.random.PRNGKey(size), 3)
    q, k, v = (jax.random.normal(key, (BATCH, size, size, HEADS, HEAD_DIM)) for key in keys)
    for kernel_size in kernel_sizes:
      for dilation in (1, 2):
        windows = (window.Neighborhood(kernel_size, dilation),) * 2
        fractions = {
          "xla": window.tile_plan((size, size), windows, (args.tile, args.tile)).visited_fraction,
          "reference": 1.0,
        }
        if backend in pallas.KERNELS:  # impl="pallas" runs the backend's kernel
          kernel_tile = pallas.kernel_tile(backend, (size, size), windows)
          fractions["pallas"] = window.tile_plan(
            (size, size), windows, kernel_tile
          ).visited_fraction
        for impl in fractions:
          fwd, fwd_bwd = build(impl, kernel_size, dilation, args.tile)
          for pass_name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            record = {
              "size": size,
              "kernel_size": kernel_size,
              "dilation": dilation,
              "impl": impl,
              "pass": pass_name,
              "visited_fraction": fractions[impl],
            }
            record.update(measure(fn, (q, k, v), args.repeats, max_run_bytes))
            records.append(record)
            print(json.dumps(record), flush=True)
  RESULTS.mkdir(exist_ok=True)
  meta = {
    "device": str(jax.devices()[0]),
    "batch": BATCH,
    "heads": HEADS,
    "head_dim": HEAD_DIM,
    "tile": [args.tile, args.tile],
    "pallas_kernel": backend if backend in pallas.KERNELS else None,
  }
  out = {"meta": meta, "records": records}
  (RESULTS / "neighborhood.json").write_text(json.dumps(out, indent=1))
  plot(records)
  summarize(records)


def _lookup(records, **where):
  for r in records:
    if all(r.get(key) == value for key, value in where.items()):
      return r
  return None


def summarize(records) -> None:
  for size in sorted({r["size"] for r in records}):
    for pass_name in ("fwd", "fwd+bwd"):
      where = {"size": size, "kernel_size": 7, "dilation": 1, "pass": pass_name}
      dense = _lookup(records, impl="reference", **where)
      for impl in ("xla", "pallas"):
        fast = _lookup(records, impl=impl, **where)
        if not (fast and dense):
          continue
        memory = dense["peak_bytes"] / fast["peak_bytes"]
        line = f"{size}x{size} 7x7 {pass_name}: peak memory dense / {impl} = {memory:.1f}x"
        if "seconds" in fast and "seconds" in dense:
          line += f", time dense / {impl} = {dense['seconds'] / fast['seconds']:.1f}x"
        print(line)


def plot(records) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  configs = sorted({(r["size"], r["kernel_size"], r["dilation"]) for r in records})
  labels = [f"{s}x{s}\nk{k} d{d}" for s, k, d in configs]
  fig, axes = plt.subplots(2, 2, figsize=(13, 8))
  impls = [i for i in ("xla", "pallas", "reference") if _lookup(records, impl=i)]
  width = 0.8 / len(impls)
  for col, pass_name in enumerate(("fwd", "fwd+bwd")):
    for n, impl in enumerate(impls):
      offset = (n - (len(impls) - 1) / 2) * width
      rows = [
        _lookup(records, size=s, kernel_size=k, dilation=d, impl=impl, **{"pass": pass_name})
        for s, k, d in configs
      ]
      xs = [i + offset for i in range(len(configs))]
      seconds = [r.get("seconds", float("nan")) for r in rows]
      axes[0, col].bar(xs, seconds, width, label=impl)
      axes[1, col].bar(xs, [r["peak_bytes"] / 2**20 for r in rows], width, label=impl)
    for row, what in ((0, "time (s)"), (1, "compiled peak memory (MiB)")):
      axes[row, col].set_title(f"{pass_name}: {what}")
      axes[row, col].set_yscale("log")
      axes[row, col].set_xticks(range(len(configs)), labels, fontsize=7)
  axes[0, 0].legend()
  fig.tight_layout()
  fig.savefig(RESULTS / "neighborhood.png", dpi=100)


if __name__ == "__main__":
  main()
