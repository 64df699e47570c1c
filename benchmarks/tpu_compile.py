"""Every Pallas kernel compiled by the real XLA:TPU + Mosaic compiler, on a CPU host.

    pip install -r requirements-compile.txt     # libtpu: compile-only TPU devices
    python benchmarks/tpu_compile.py            # the full matrix, every generation
    python benchmarks/tpu_compile.py --generations v4,v5e --families chunked_linear --jobs 2
    python benchmarks/tpu_compile.py --families delta_rule --update   # rows of one family

Each case calls a public op (`dot_product_attention`, `linear_attention`,
`delta_rule_attention`, `neighborhood_attention`) with `impl="pallas"`, forward or gradient,
and compiles it for one chip of a generation (`attnjax.aot.GENERATIONS`). The table says, per
case and generation, "ok" or the compiler's error, the largest VMEM any of its Mosaic kernels
was given (`used_scoped_memory_configs`, read from the compiled program) and the SMEM of the
largest scalar-prefetch tables one kernel call reads (their operand bytes; a table split over
calls counts per call). It is written to `benchmarks/results/tpu_compile.{md,json}`;
`--update` replaces only the rows of the cases compiled. `tests/hardware/test_tpu_compile.py`
compiles the `CI` subset of the same cases.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import attnjax as aj  # noqa: E402
from attnjax import aot  # noqa: E402
from attnjax.ops.softmax.blockwise import BlockSizes  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FAMILIES = ("block_sparse", "chunked_linear", "delta_rule", "neighborhood")
T = 8192  # sequence length of the 1-D cases
HEADS, KV_HEADS = 8, 2  # GQA 4:1


@dataclasses.dataclass(frozen=True)
class Case:
  """One compile: `op(*inputs)` (or its gradient) with inputs of these shapes and dtype."""

  family: str
  name: str
  op: Callable
  shapes: tuple[tuple[int, ...], ...]
  dtype: str
  grad: bool
  precision: str | None = None  # a `jax.default_matmul_precision` to trace under

  @property
  def label(self) -> str:
    dtype = self.dtype if self.precision is None else f"{self.dtype}@{self.precision}"
    return f"{self.family}/{self.name}/{dtype}/{'grad' if self.grad else 'fwd'}"

  def function(self) -> Callable:
    fn = self.op
    if self.grad:

      def loss(*inputs):
        return jnp.sum(self.op(*inputs).astype(jnp.float32))

      fn = jax.grad(loss, argnums=tuple(range(len(self.shapes))))
    if self.precision is None:
      return fn

    def under_precision(*inputs):
      with jax.default_matmul_precision(self.precision):
        return fn(*inputs)

    return under_precision

  def inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(s, jnp.dtype(self.dtype)) for s in self.shapes)


def _qkv(seq=T, heads=HEADS, kv_heads=KV_HEADS, head_dim=128, spatial=None):
  spatial = (seq,) if spatial is None else spatial
  return (1, *spatial, heads, head_dim), (1, *spatial, kv_heads, head_dim)


def _softmax(mask=None, *, segments=False, softcap=None, sinks=False, blocks=None):
  def op(q, k, v):
    seq = q.shape[1]
    return aj.ops.dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      segment_ids=jnp.arange(seq, dtype=jnp.int32)[None] * 3 // seq if segments else None,
      softcap=softcap,
      sinks=jnp.linspace(-1.0, 1.0, q.shape[2]) if sinks else None,
      block_sizes=blocks,
      impl="pallas",
    )

  return op


def _per_head_windows(heads=HEADS):
  return aj.masks.per_head(
    [aj.masks.causal() & aj.masks.sliding_window(1024 * (i + 1) - 1) for i in range(heads)]
  )


def block_sparse_cases() -> Iterator[tuple[str, Callable, tuple, tuple[str, ...]]]:
  """(name, op, shapes, dtypes) of the block-sparse softmax kernel."""
  for head_dim in (64, 128, 256):
    q, kv = _qkv(head_dim=head_dim)
    yield f"causal_hd{head_dim}", _softmax(aj.masks.causal()), (q, kv, kv), ("float32", "bfloat16")
  q, kv = _qkv()
  masks = {
    "sliding_window_1k": aj.masks.causal() & aj.masks.sliding_window(1023),
    "chunked_2k": aj.masks.causal() & aj.masks.chunked(2048),
    "prefix_1k": aj.masks.prefix_lm(1024),
    "per_head_windows": _per_head_windows(),
  }
  for name, mask in masks.items():
    yield name, _softmax(mask), (q, kv, kv), ("bfloat16",)
  yield (
    "segments_softcap_sinks",
    _softmax(aj.masks.causal(), segments=True, softcap=30.0, sinks=True),
    (q, kv, kv),
    ("float32", "bfloat16"),
  )
  q1, kv1 = _qkv(kv_heads=1)
  yield "mqa_causal", _softmax(aj.masks.causal()), (q1, kv1, kv1), ("bfloat16",)
  for seq in (65536, 131072):  # the SMEM limit: one table row per (head, query tile)
    qs, kvs = _qkv(seq=seq)
    op = _softmax(_per_head_windows(), blocks=BlockSizes(128, 128))
    yield f"per_head_windows_T{seq}_tiles128", op, (qs, kvs, kvs), ("bfloat16",)


def _linear(decay: str):
  def op(q, k, v):
    b, t, h, d = q.shape
    log_decay = {
      "none": None,
      "head": -jnp.linspace(0.01, 0.5, h),
      "scalar": -jnp.full((b, t, h), 0.05),
      "vector": -jnp.full((b, t, h, d), 0.05),
    }[decay]
    return aj.ops.linear_attention(q, k, v, log_decay=log_decay, impl="pallas")

  return op


def chunked_linear_cases(head_dims=(128, 256)):
  """(name, op, shapes, dtypes) of the chunked linear-attention kernel."""
  for head_dim in head_dims:
    q, kv = _qkv(head_dim=head_dim)
    for decay in ("none", "head", "scalar", "vector"):
      yield f"{decay}_hd{head_dim}", _linear(decay), (q, kv, kv), ("float32", "bfloat16")


def _delta_rule(gated: bool):
  def op(q, k, v):
    b, t, h, _ = q.shape
    beta = jnp.full((b, t, h), 0.5)
    log_decay = jnp.full((b, t, h), -0.05) if gated else None
    return aj.ops.delta_rule_attention(q, k, v, beta, log_decay=log_decay, impl="pallas")

  return op


def delta_rule_cases(head_dims=(128, 256)):
  """(name, op, shapes, dtypes) of the delta-rule state-pass kernel (DeltaNet, Gated DeltaNet)."""
  for head_dim in head_dims:
    q, kv = _qkv(head_dim=head_dim)
    for name, gated in (("deltanet", False), ("gated", True)):
      yield f"{name}_hd{head_dim}", _delta_rule(gated), (q, kv, kv), ("float32", "bfloat16")


def _neighborhood(kernel_size, dilation=1, causal=False):
  return functools.partial(
    aj.ops.neighborhood_attention,
    kernel_size=kernel_size,
    dilation=dilation,
    causal=causal,
    impl="pallas",
  )


def neighborhood_cases(head_dims=(64,)):
  """(name, op, shapes, dtypes) of the neighborhood-attention kernel (names of head dims other
  than 64 end in `_hd<dim>`)."""
  geometries = {
    "1d_k63": ((T,), _neighborhood(63)),
    "1d_k63_causal": ((T,), _neighborhood(63, causal=True)),
    "2d_7x7_dilation_1x2": ((64, 64), _neighborhood(7, dilation=(1, 2))),
    "2d_7x7_causal": ((64, 64), _neighborhood(7, causal=(True, True))),
    "3d_3x7x7": ((8, 32, 32), _neighborhood((3, 7, 7))),
  }
  for name, (spatial, op) in geometries.items():
    for head_dim in head_dims:
      q, kv = _qkv(head_dim=head_dim, spatial=spatial)
      suffix = "" if head_dim == 64 else f"_hd{head_dim}"
      yield name + suffix, op, (q, kv, kv), ("float32", "bfloat16")


CASE_SOURCES = {
  "block_sparse": block_sparse_cases,
  "chunked_linear": chunked_linear_cases,
  "delta_rule": delta_rule_cases,
  "neighborhood": neighborhood_cases,
}

# What CI compiles on every generation: one case per kernel family and pass, the dtype that
# matters on TPU (bf16), and the masks that stress tables (per-head) and mask tiles (window).
CI = (
  "block_sparse/causal_hd128/bfloat16/fwd",
  "block_sparse/sliding_window_1k/bfloat16/grad",
  "block_sparse/segments_softcap_sinks/float32/grad",
  "chunked_linear/vector_hd128/bfloat16/grad",
  "chunked_linear/head_hd256/float32/fwd",
  "neighborhood/2d_7x7_dilation_1x2/bfloat16/grad",
  "neighborhood/1d_k63_causal/float32/fwd",
)


def cases(families=FAMILIES) -> list[Case]:
  """Every case of `families`, forward and gradient, in every listed dtype."""
  out = []
  for family in families:
    for name, op, shapes, dtypes in CASE_SOURCES[family]():
      for dtype in dtypes:
        for grad in (False, True):
          out.append(Case(family, name, op, shapes, dtype, grad))
  return out


def ci_cases() -> list[Case]:
  by_label = {c.label: c for c in cases()}
  return [by_label[label] for label in CI]


def scalar_prefetch_bytes(fn: Callable, inputs) -> int:
  """Bytes of the largest scalar-prefetch operands (SMEM tables) of any one pallas_call in
  `fn`: what must fit a chip's SMEM (a table split over several calls counts per call)."""
  largest = 0

  def visit(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        n = eqn.params["grid_mapping"].num_index_operands
        largest = max(largest, sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars[:n]))
      for sub in aot.subjaxprs(eqn):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*inputs).jaxpr)
  return largest


@dataclasses.dataclass
class Result:
  label: str
  generation: str
  ok: bool
  error: str
  seconds: float
  kernels: int
  vmem_bytes: int
  smem_bytes: int


def compile_case(case: Case, generation: str) -> Result:
  """Compiles `case` for one chip of `generation`; compiler errors become the result."""
  device = aot.tpu_devices(aot.GENERATIONS[generation])[0]
  start = time.perf_counter()
  kernels = vmem = smem = 0
  try:
    fn = case.function()
    smem = scalar_prefetch_bytes(fn, case.inputs())
    compiled = aot.compile_for(fn, [device], *case.inputs())
    used = aot.kernel_scoped_memory(compiled)
    kernels = len(used)
    vmem = max((u.get(aot.VMEM_SPACE, 0) for u in used), default=0)
    ok, error = kernels > 0, "" if kernels else "no Mosaic kernel in the compiled program"
  except Exception as e:  # the compiler's message is the result
    ok, error = False, _first_line(e)
  return Result(case.label, generation, ok, error, time.perf_counter() - start, kernels, vmem, smem)


def _first_line(e: Exception) -> str:
  lines = [line for line in str(e).splitlines() if line.strip()]
  interesting = [line for line in lines if "error" in line.lower() or "exhausted" in line.lower()]
  return f"{type(e).__name__}: {(interesting or lines or [''])[0].strip()[:300]}"


def _run(label: str, generation: str) -> Result:
  by_label = {c.label: c for c in cases()}
  return compile_case(by_label[label], generation)


def markdown(results: list[Result], generations: list[str]) -> str:
  """The table: one row per case, one column per generation."""
  table = {(r.label, r.generation): r for r in results}
  labels = list(dict.fromkeys(r.label for r in results))
  header = (
    "| case | " + " | ".join(generations) + " | VMEM (max kernel) | SMEM (largest call's tables) |"
  )
  rows = [header, "|" + "---|" * (len(generations) + 3)]
  for label in labels:
    cells = []
    for g in generations:
      r = table[(label, g)]
      cells.append("ok" if r.ok else f"FAIL: {r.error.replace('|', '/')[:120]}")
    any_r = next(table[(label, g)] for g in generations)
    vmem = max(table[(label, g)].vmem_bytes for g in generations)
    rows.append(
      f"| {label} | " + " | ".join(cells) + f" | {vmem / 2**20:.2f} MiB | "
      f"{any_r.smem_bytes / 2**10:.1f} KiB |"
    )
  totals = " | ".join(
    f"{sum(table[(lb, g)].ok for lb in labels)}/{len(labels)}" for g in generations
  )
  rows.append(f"| **compiled** | {totals} | | |")
  return "\n".join(rows) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--generations", default=",".join(aot.GENERATIONS))
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--ci", action="store_true", help="only the subset CI compiles")
  parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
  parser.add_argument("--out", default=str(RESULTS / "tpu_compile"))
  parser.add_argument(
    "--update", action="store_true", help="keep the other cases' results already in --out"
  )
  args = parser.parse_args(argv)
  generations = args.generations.split(",")
  selected = ci_cases() if args.ci else cases(tuple(args.families.split(",")))
  work = [(c.label, g) for c in selected for g in generations]
  print(f"{len(work)} compiles ({len(selected)} cases x {len(generations)} generations)")
  results = []
  with concurrent.futures.ProcessPoolExecutor(
    args.jobs, mp_context=multiprocessing.get_context("spawn")
  ) as pool:
    for result in pool.map(_run, *zip(*work, strict=True)):
      status = "ok" if result.ok else result.error
      print(f"{result.generation:6s} {result.label:60s} {result.seconds:6.1f}s {status}")
      results.append(result)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if args.update and out.with_suffix(".json").exists():
    fresh = {(r.label, r.generation) for r in results}
    kept = [Result(**r) for r in json.loads(out.with_suffix(".json").read_text())["results"]]
    results = [r for r in kept if (r.label, r.generation) not in fresh] + results
    order = {c.label: i for i, c in enumerate(cases())}
    results.sort(key=lambda r: order.get(r.label, len(order)))
    generations = list(dict.fromkeys([*generations, *(r.generation for r in kept)]))
  out.with_suffix(".md").write_text(markdown(results, generations))
  meta = {"jax": jax.__version__, "libtpu": _libtpu_version(), "numpy": np.__version__}
  out.with_suffix(".json").write_text(
    json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1)
  )
  print(markdown(results, generations))
  failed = sum(not r.ok for r in results)
  print(f"{len(results) - failed}/{len(results)} compiled; table in {out.with_suffix('.md')}")
  return 1 if failed else 0


def _libtpu_version() -> str:
  from importlib import metadata

  return metadata.version("libtpu")


if __name__ == "__main__":
  sys.exit(main())
