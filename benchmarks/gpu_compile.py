"""Every Pallas GPU kernel compiled by the real XLA:GPU + Triton + ptxas, on a CPU host.

    pip install -r requirements-compile.txt     # the CUDA plugin and ptxas: compile-only GPUs
    python benchmarks/gpu_compile.py            # the full matrix, H200 (sm_90a) and A100 (sm_80)
    python benchmarks/gpu_compile.py --gpus h200 --families neighborhood --jobs 2
    python benchmarks/gpu_compile.py --families block_sparse --update   # rows of one family
    python benchmarks/gpu_compile.py --match hd256/float32 --gpus a100 --out /tmp/probe

The cases are those of `benchmarks/tpu_compile.py` (public ops with `impl="pallas"`, forward
and gradient, T=8192, GQA 8:2), with head dims 64/128/256 (neighborhood: 64 and 256) and each
case in bfloat16, float16, float32 and float32 traced under
`jax.default_matmul_precision("highest")`.
Each is compiled for one compile-only GPU (`attnjax.aot.gpu_devices`). The table gives per
case and GPU "ok" or the compiler's error, and over the program's Pallas kernels the largest
shared memory at launch, the most registers per thread and spilled bytes (`ptxas -v`), and
whether any kernel's PTX multiplies in TF32. Written to `benchmarks/results/gpu_compile.{md,json}`;
`--update` replaces only the rows compiled. `tests/hardware/test_gpu_compile.py` compiles the
`CI` subset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from attnjax import aot  # noqa: E402
from benchmarks import tpu_compile  # noqa: E402
from benchmarks.tpu_compile import Case, _first_line  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FAMILIES = tpu_compile.FAMILIES
GPUS = tuple(aot.GPU_TARGETS)
DTYPES = ("bfloat16", "float16", "float32", "float32@highest")
HEAD_DIMS = (64, 128, 256)

# What CI compiles for each GPU: every family forward and backward at the largest head dim
# (the shared-memory limit), bf16 and exact float32, and the masks/decays that add operands.
CI = (
  "block_sparse/causal_hd256/bfloat16/grad",
  "block_sparse/segments_softcap_sinks/float32@highest/grad",
  "chunked_linear/vector_hd256/bfloat16/grad",
  "chunked_linear/head_hd256/float32@highest/fwd",
  "delta_rule/gated_hd256/bfloat16/grad",
  "neighborhood/3d_3x7x7/bfloat16/grad",
  "neighborhood/1d_k63_causal/float32@highest/fwd",
)


def _sources(family: str):
  if family in ("chunked_linear", "delta_rule"):
    return tpu_compile.CASE_SOURCES[family](head_dims=HEAD_DIMS)
  if family == "neighborhood":
    return tpu_compile.CASE_SOURCES[family](head_dims=(64, 256))
  return tpu_compile.CASE_SOURCES[family]()


def cases(families=FAMILIES) -> list[Case]:
  """Every case of `families`, forward and gradient, in every dtype of `DTYPES` (without the
  TPU matrix's long-sequence cases: they stress SMEM tables, which a GPU reads from HBM)."""
  out = []
  for family in families:
    for name, op, shapes, _ in _sources(family):
      if "_T" in name:
        continue
      for dtype in DTYPES:
        dtype, _, precision = dtype.partition("@")
        for grad in (False, True):
          out.append(Case(family, name, op, shapes, dtype, grad, precision or None))
  return out


def ci_cases() -> list[Case]:
  by_label = {c.label: c for c in cases()}
  return [by_label[label] for label in CI]


@dataclasses.dataclass
class Result:
  label: str
  gpu: str
  ok: bool
  error: str
  seconds: float
  kernels: list[dict]  # aot.GpuKernel fields, one per Pallas kernel

  @property
  def shared_memory(self) -> int:
    return max((k["shared_memory"] for k in self.kernels), default=0)

  @property
  def registers(self) -> int:
    return max((k["registers"] for k in self.kernels), default=0)

  @property
  def spill_bytes(self) -> int:
    return max((k["spill_bytes"] for k in self.kernels), default=0)

  @property
  def tf32(self) -> bool:
    return any(k["tf32"] for k in self.kernels)


def compile_case(case: Case, gpu: str) -> Result:
  """Compiles `case` for `gpu`; compiler errors become the result."""
  device = aot.gpu_devices(gpu)[0]
  start = time.perf_counter()
  kernels = []
  try:
    _, found = aot.compile_for_gpu(case.function(), device, *case.inputs())
    kernels = [dataclasses.asdict(k) for k in found]
    ok, error = bool(kernels), "" if kernels else "no Pallas kernel in the compiled program"
  except Exception as e:  # the compiler's message is the result
    ok, error = False, _first_line(e)
  return Result(case.label, gpu, ok, error, time.perf_counter() - start, kernels)


def _run(label: str, gpu: str) -> Result:
  by_label = {c.label: c for c in cases()}
  return compile_case(by_label[label], gpu)


def markdown(results: list[Result], gpus: list[str]) -> str:
  """One row per case: the result per GPU, then each GPU's largest kernel figures."""
  table = {(r.label, r.gpu): r for r in results}
  labels = list(dict.fromkeys(r.label for r in results))
  figures = " | ".join(f"{g}: smem KiB / regs / spill B / TF32" for g in gpus)
  rows = [f"| case | {' | '.join(gpus)} | {figures} |", "|" + "---|" * (2 * len(gpus) + 1)]
  for label in labels:
    cells, usage = [], []
    for g in gpus:
      r = table.get((label, g))
      if r is None:
        cells.append("not run")
        usage.append("")
        continue
      cells.append("ok" if r.ok else f"FAIL: {r.error.replace('|', '/')[:120]}")
      usage.append(
        f"{r.shared_memory / 2**10:.0f} / {r.registers} / {r.spill_bytes} / "
        f"{'yes' if r.tf32 else 'no'}"
        if r.ok
        else ""
      )
    rows.append(f"| {label} | " + " | ".join(cells + usage) + " |")
  totals = " | ".join(
    f"{sum(table[(lb, g)].ok for lb in labels if (lb, g) in table)}/"
    f"{sum((lb, g) in table for lb in labels)}"
    for g in gpus
  )
  rows.append(f"| **compiled** | {totals} |" + " |" * len(gpus))
  return "\n".join(rows) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gpus", default=",".join(GPUS))
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--ci", action="store_true", help="only the subset CI compiles")
  parser.add_argument("--match", default="", help="only cases whose label contains this")
  parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
  parser.add_argument("--out", default=str(RESULTS / "gpu_compile"))
  parser.add_argument(
    "--update", action="store_true", help="keep the other cases' results already in --out"
  )
  args = parser.parse_args(argv)
  gpus = args.gpus.split(",")
  selected = ci_cases() if args.ci else cases(tuple(args.families.split(",")))
  selected = [c for c in selected if args.match in c.label]
  work = [(c.label, g) for c in selected for g in gpus]
  print(f"{len(work)} compiles ({len(selected)} cases x {len(gpus)} GPUs)")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  kept = []
  if args.update and out.with_suffix(".json").exists():
    fresh = set(work)
    kept = [Result(**r) for r in json.loads(out.with_suffix(".json").read_text())["results"]]
    kept = [r for r in kept if (r.label, r.gpu) not in fresh]
    gpus = list(dict.fromkeys([*gpus, *(r.gpu for r in kept)]))
  results = []
  with concurrent.futures.ProcessPoolExecutor(
    args.jobs, mp_context=multiprocessing.get_context("spawn")
  ) as pool:
    for result in pool.map(_run, *zip(*work, strict=True)):
      status = "ok" if result.ok else result.error
      print(f"{result.gpu:5s} {result.label:64s} {result.seconds:6.1f}s {status}", flush=True)
      results.append(result)
      _write(out, kept + results, gpus)  # a long run that is stopped keeps what it compiled
  print(markdown(_ordered(kept + results), gpus))
  failed = sum(not r.ok for r in results)
  print(f"{len(results) - failed}/{len(results)} compiled; table in {out.with_suffix('.md')}")
  return 1 if failed else 0


def _ordered(results: list[Result]) -> list[Result]:
  order = {c.label: i for i, c in enumerate(cases())}
  return sorted(results, key=lambda r: order.get(r.label, len(order)))


def _write(out: pathlib.Path, results: list[Result], gpus: list[str]) -> None:
  results = _ordered(results)
  out.with_suffix(".md").write_text(markdown(results, gpus))
  meta = {"jax": jax.__version__, "cuda_plugin": _plugin_version(), "ptxas": aot.ptxas_path()}
  out.with_suffix(".json").write_text(
    json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1)
  )


def _plugin_version() -> str:
  from importlib import metadata

  return metadata.version("jax-cuda12-plugin")


if __name__ == "__main__":
  sys.exit(main())
