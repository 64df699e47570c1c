"""The VMEM budget every Mosaic (TPU) kernel of kernels_pallas declares: its pipelined blocks
twice (double buffering), its scratch once, its live temporaries and Mosaic's own headroom,
checked against the smallest VMEM of the TPU generations the kernels compile for."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# The TPU generations the Mosaic kernels compile for; a kernel's VMEM limit must fit the
# smallest VMEM of one TensorCore among them.
TPU_CHIPS = ("TPU_V4", "TPU_V5E", "TPU_V5P", "TPU_V6E", "TPU_7X")
# Mosaic's own scratch (spills, relayouts, internal buffers) on top of what a kernel declares.
MOSAIC_HEADROOM_BYTES = 4 << 20
LANES = 128

Block = tuple[tuple[int, ...], object]  # (shape, dtype)


@functools.cache
def smallest_tpu_vmem_bytes() -> int:
  """VMEM of one TensorCore of the smallest generation in `TPU_CHIPS` (Pallas' TPU tables)."""
  return min(
    pltpu.get_tpu_info_for_chip(pltpu.ChipVersion[chip], 1).vmem_capacity_bytes
    for chip in TPU_CHIPS
  )


def vmem_bytes(shape: tuple[int, ...], dtype) -> int:
  """Bytes of a `shape` buffer in VMEM, its last two dims padded to whole (sublane, 128) tiles
  (a sublane holds 8 rows of 32 bits, so 16 of bfloat16)."""
  itemsize = np.dtype(dtype).itemsize
  *lead, rows, cols = (1, *shape) if len(shape) == 1 else shape
  sublanes = 8 * (4 // itemsize) if itemsize < 4 else 8
  return math.prod(lead) * -(-rows // sublanes) * sublanes * -(-cols // LANES) * LANES * itemsize


def nbytes(*arrays) -> int:
  """Total bytes of arrays (or shape-dtype structs) in HBM."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in arrays)


def spec_blocks(specs: Sequence[pl.BlockSpec], arrays: Sequence) -> list[Block]:
  """(block shape without squeezed dims, dtype) of each blocked spec; whole-array specs (SMEM,
  ANY) are not pipelined through VMEM and are left out."""
  return [
    (tuple(d for d in spec.block_shape if isinstance(d, int)), array.dtype)
    for spec, array in zip(specs, arrays, strict=True)
    if spec.block_shape is not None
  ]


def vmem_limit_bytes(blocks: Iterable[Block], scratch: Iterable[Block] = (), temporaries=0) -> int:
  """A Mosaic kernel's `vmem_limit_bytes`: its pipelined `(block shape, dtype)`s twice (double
  buffering), its `scratch` once, `temporaries` bytes of live values and Mosaic's headroom,
  rounded up to MiB.

  Raises ValueError naming the limit when it exceeds `smallest_tpu_vmem_bytes()`.
  """
  needed = (
    2 * sum(vmem_bytes(shape, dtype) for shape, dtype in blocks)
    + sum(vmem_bytes(shape, dtype) for shape, dtype in scratch)
    + temporaries
    + MOSAIC_HEADROOM_BYTES
  )
  limit = -(-needed // (1 << 20)) << 20
  capacity = smallest_tpu_vmem_bytes()
  if limit > capacity:
    raise ValueError(
      f"vmem_limit_bytes={limit} (double-buffered blocks + scratch) exceeds the {capacity} "
      f"bytes of VMEM of the smallest TPU generation ({', '.join(TPU_CHIPS)}); use smaller blocks"
    )
  return limit


def compiler_params(
  semantics: tuple[str, ...],
  in_specs: Sequence[pl.BlockSpec],
  operands: Sequence,
  out_specs: Sequence[pl.BlockSpec],
  out_shapes: Sequence,
  scratch: Sequence = (),
  temporaries: int = 0,
) -> pltpu.CompilerParams:
  """`dimension_semantics` and the VMEM limit of a call: its blocked inputs and outputs,
  `scratch` (`pltpu.VMEM` shapes) and `temporaries` bytes of live values per grid step."""
  blocks = spec_blocks(in_specs, operands) + spec_blocks(out_specs, out_shapes)
  return pltpu.CompilerParams(
    dimension_semantics=semantics,
    vmem_limit_bytes=vmem_limit_bytes(blocks, [(s.shape, s.dtype) for s in scratch], temporaries),
  )
