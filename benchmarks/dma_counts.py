"""HBM <-> VMEM traffic and grid steps of Pallas TPU kernels, counted in the TPU interpreter.

    python benchmarks/dma_counts.py block_sparse          # table for the fixed problem below
    python benchmarks/dma_counts.py delta_rule            # the delta rule's walk over chunks

`count(fn, *args)` runs `fn` (whose kernels are called with
`interpret=pltpu.InterpretParams(...)`) and counts, per `pallas_call`, what the interpreter
copies. The interpreter follows the TPU pipeline's rule: an input block is copied into VMEM
only when its block index differs from the previous grid step's (or on the first step), and an
output block is written back only when its index is about to change (or on the last step).
So the counts are the pipeline's DMA traffic on a TPU, plus the explicit DMAs a kernel starts
with `pltpu.make_async_copy`. Scalar-prefetch operands (copied to SMEM once per call) are
reported separately. The interpreter visits the grid's "parallel" dimensions in a random
order (a TPU walks them in order), so a block whose index depends on them may be counted once
more or less at the boundaries of those dimensions; along "arbitrary" dimensions the counts
are exact.

How: while `fn` is lowered, `interpret_pallas_call` is wrapped so that each `pallas_call` gets
its own recorders in place of the interpreter's `get` / `store` callbacks (only the pipeline's
own copies pass an operand name), its grid-point recorder and its DMA objects. JAX's caches are
cleared first so that `fn` is lowered again under the wrappers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys

import jax
import numpy as np
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter


@dataclasses.dataclass
class CallCounts:
  """What one `pallas_call` moved; `*_by_operand` keys are the kernel's ref names ("dma" for
  explicit DMAs). Identical calls in one program are lowered once and share a record, which
  adds up their runs."""

  name: str
  grid: tuple[int, ...]
  grid_steps: int = 0
  hbm_to_vmem_bytes: int = 0
  vmem_to_hbm_bytes: int = 0
  scalar_prefetch_bytes: int = 0
  hbm_to_vmem_by_operand: dict[str, int] = dataclasses.field(default_factory=dict)
  vmem_to_hbm_by_operand: dict[str, int] = dataclasses.field(default_factory=dict)

  def add_read(self, operand: str, nbytes: int) -> None:
    self.hbm_to_vmem_bytes += nbytes
    by = self.hbm_to_vmem_by_operand
    by[operand] = by.get(operand, 0) + nbytes

  def add_write(self, operand: str, nbytes: int) -> None:
    self.vmem_to_hbm_bytes += nbytes
    by = self.vmem_to_hbm_by_operand
    by[operand] = by.get(operand, 0) + nbytes


@dataclasses.dataclass
class Counts:
  """Totals over every `pallas_call` that `fn` ran, and each call's `CallCounts`."""

  grid_steps: int
  hbm_to_vmem_bytes: int
  vmem_to_hbm_bytes: int
  per_call: list[CallCounts]


_HBM = interpreter.TPU_MEMORY_SPACE_IDXS[interpreter.mosaic_core.MemorySpace.HBM]
_VMEM_NAME = interpreter.mosaic_core.MemorySpace.VMEM.value
_HBM_NAMES = {
  interpreter.mosaic_core.MemorySpace.HBM.value,
  interpreter.pallas_core.MemorySpace.ANY.value,
}
_current_dma_call: list[CallCounts] = []  # the call whose `dma_start` is running


def _pipeline_get(record: CallCounts, get, *args, input_name=None, **kwargs):
  token, value = get(*args, input_name=input_name, **kwargs)
  memory_space = args[3]
  if input_name is not None and int(memory_space) == _HBM:
    record.add_read(input_name, value.nbytes)
  return token, value


def _pipeline_store(record: CallCounts, store, *args, output_name=None, **kwargs):
  if output_name is not None:
    record.add_write(output_name, np.asarray(args[6]).nbytes)
  return store(*args, output_name=output_name, **kwargs)


def _dma_start(record: CallCounts, dma_start, *args, **kwargs):
  _current_dma_call.append(record)
  try:
    return dma_start(*args, **kwargs)
  finally:
    _current_dma_call.pop()


@dataclasses.dataclass
class _CountedDMA(interpreter.DMA):
  """An interpreter DMA that adds its bytes to the call that started it."""

  def __post_init__(self):
    self.counted_in = _current_dma_call[-1] if _current_dma_call else None

  def execute_read(self):
    super().execute_read()
    record = self.counted_in
    if record is None:
      return
    src = interpreter.TPU_MEMORY_SPACE_NAMES[int(self.src_memory_space)]
    dst = interpreter.TPU_MEMORY_SPACE_NAMES[int(self.dst_memory_space)]
    if src in _HBM_NAMES and dst == _VMEM_NAME:
      record.add_read("dma", self.data_size)
    elif src == _VMEM_NAME and dst in _HBM_NAMES:
      record.add_write("dma", self.data_size)


@contextlib.contextmanager
def _replaced(**wrappers):
  """Replaces the interpreter's module attributes by `wrapper(original)` while active."""
  originals = {name: getattr(interpreter, name) for name in wrappers}
  for name, wrap in wrappers.items():
    setattr(interpreter, name, wrap(originals[name]))
  try:
    yield
  finally:
    for name, original in originals.items():
      setattr(interpreter, name, original)


def _counting_interpreter(records: list[CallCounts], interpret_pallas_call):
  """`interpret_pallas_call` giving each call its own recorders (bound while it is lowered)."""

  def interpret(*args, interpret_params, grid_mapping, name, **kwargs):
    record = CallCounts(name=str(name), grid=tuple(int(g) for g in grid_mapping.grid))
    records.append(record)
    scalars = args[
      grid_mapping.num_dynamic_grid_bounds : grid_mapping.num_dynamic_grid_bounds
      + grid_mapping.num_index_operands
    ]
    record.scalar_prefetch_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in scalars)
    user_recorder = interpret_params.grid_point_recorder

    def record_grid_point(token, grid_point, core_id):
      record.grid_steps += 1
      return token if user_recorder is None else user_recorder(token, grid_point, core_id)

    params = dataclasses.replace(interpret_params, grid_point_recorder=record_grid_point)
    with _replaced(
      get=functools.partial(functools.partial, _pipeline_get, record),
      store=functools.partial(functools.partial, _pipeline_store, record),
      dma_start=functools.partial(functools.partial, _dma_start, record),
    ):
      return interpret_pallas_call(
        *args, interpret_params=params, grid_mapping=grid_mapping, name=name, **kwargs
      )

  return interpret


def count(fn, *args, **kwargs) -> Counts:
  """Runs `fn(*args, **kwargs)` and counts the interpreted TPU kernels' copies and grid steps.

  `fn` must call its kernels with `interpret=pltpu.InterpretParams(...)` (the TPU
  interpreter); `interpret=True` uses another interpreter and counts nothing.
  """
  records: list[CallCounts] = []
  jax.clear_caches()
  with _replaced(
    interpret_pallas_call=functools.partial(_counting_interpreter, records),
    DMA=lambda _: _CountedDMA,
  ):
    jax.block_until_ready(fn(*args, **kwargs))
  jax.clear_caches()  # later calls must not reuse the counting lowering
  return Counts(
    grid_steps=sum(r.grid_steps for r in records),
    hbm_to_vmem_bytes=sum(r.hbm_to_vmem_bytes for r in records),
    vmem_to_hbm_bytes=sum(r.vmem_to_hbm_bytes for r in records),
    per_call=records,
  )


# ---------------------------------------------------------------------------------------------
# The command line: a table for one fixed problem per kernel family.


def block_sparse_problems() -> dict:
  """Name -> zero-argument function running the block-sparse TPU kernel, interpreted.

  T=2048, batch 1, 8 query heads over 2 kv heads, head_dim 128, bf16, 128 x 128 tiles;
  causal and causal sliding window of 512, forward and gradient; and causal with the default
  512 x 512 tiles.
  """
  import jax.numpy as jnp
  from jax.experimental.pallas import tpu as pltpu

  from attnjax import masks
  from attnjax.ops.softmax import pallas
  from kernels_pallas.block_sparse import tpu

  seq, heads, kv_heads, head_dim = 2048, 8, 2, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, seq, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, kv_heads, head_dim), jnp.bfloat16)
  params = pltpu.InterpretParams()
  problems = {}
  for mask_name, mask, tile in (
    ("causal", masks.causal(), 128),
    ("window512", masks.causal() & masks.sliding_window(512), 128),
    ("causal_t512", masks.causal(), 512),
  ):
    info = pallas.mask_info(mask, seq, seq, tile, tile, 0)

    def forward(q, k, v, info=info):
      return tpu.block_sparse_attention(q, k, v, info, scale=0.1, interpret=params)[0]

    def gradient(q, k, v, forward=forward):
      return jax.grad(lambda *x: forward(*x).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    problems[f"{mask_name}/fwd"] = functools.partial(jax.jit(forward), q, k, v)
    problems[f"{mask_name}/grad"] = functools.partial(jax.jit(gradient), q, k, v)
  return problems


def delta_rule_problems() -> dict:
  """Name -> zero-argument function running the delta rule's TPU kernels, interpreted.

  Gated DeltaNet, T=2048, batch 1, 8 query heads over 2 kv heads, head_dim 128, bf16, chunks of
  64 tokens (32 chunks x 8 heads = 256 grid steps per call); forward and gradient, through the
  op's adapter (the chunk terms in XLA, the walk in the kernels).
  """
  import jax.numpy as jnp
  from jax.experimental.pallas import tpu as pltpu

  from attnjax.ops.delta import pallas

  seq, heads, kv_heads, head_dim = 2048, 8, 2, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(keys[0], (1, seq, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, head_dim), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, kv_heads, head_dim), jnp.bfloat16)
  beta = jax.nn.sigmoid(jax.random.normal(keys[3], (1, seq, heads)))
  log_decay = jax.nn.log_sigmoid(2.0 + jax.random.normal(keys[4], (1, seq, heads)))
  state = jnp.zeros((1, heads, head_dim, head_dim), jnp.float32)

  def forward(q, k, v, beta, log_decay):
    return pallas.delta_rule_attention(
      q, k, v, beta, log_decay=log_decay, carry=None, initial_state=state, scale=0.1,
      chunk_size=64, interpret=pltpu.InterpretParams(), kernel="tpu",
    )  # fmt: skip

  def gradient(*operands):
    def loss(*x):
      out, final = forward(*x)
      return out.astype(jnp.float32).sum() + final.sum()

    return jax.grad(loss, argnums=tuple(range(5)))(*operands)

  operands = (q, k, v, beta, log_decay)
  return {
    "gated/fwd": functools.partial(jax.jit(forward), *operands),
    "gated/grad": functools.partial(jax.jit(gradient), *operands),
  }


PROBLEMS = {"block_sparse": block_sparse_problems, "delta_rule": delta_rule_problems}


def table(counts: dict[str, Counts]) -> str:
  """One row per (problem, pallas_call) and a total per problem: grid steps, bytes each way."""
  header = f"{'problem':<14} {'call':<18} {'grid steps':>10} {'HBM->VMEM':>12} {'VMEM->HBM':>12}"
  rows = [header, "-" * len(header)]
  for problem, c in counts.items():
    for name, steps, read, write in [
      *((r.name, r.grid_steps, r.hbm_to_vmem_bytes, r.vmem_to_hbm_bytes) for r in c.per_call),
      ("total", c.grid_steps, c.hbm_to_vmem_bytes, c.vmem_to_hbm_bytes),
    ]:
      rows.append(f"{problem:<14} {name:<18} {steps:>10} {read:>12} {write:>12}")
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("family", choices=sorted(PROBLEMS))
  parser.add_argument("--by_operand", action="store_true", help="also bytes per kernel operand")
  parser.add_argument("--only", default="", help="problems whose name contains this")
  args = parser.parse_args(argv)
  problems = PROBLEMS[args.family]().items()
  counts = {name: count(run) for name, run in problems if args.only in name}
  print(table(counts))
  if args.by_operand:
    for problem, c in counts.items():
      for r in c.per_call:
        print(
          f"{problem} {r.name}: read {r.hbm_to_vmem_by_operand}, "
          f"written {r.vmem_to_hbm_by_operand}, scalar prefetch {r.scalar_prefetch_bytes}"
        )


if __name__ == "__main__":
  sys.exit(main())
