"""Pieces shared by the chunked-linear kernels (`tpu.py`, `gpu.py`): argument checks, GQA sums,
and the Mosaic kernels' VMEM budget."""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import numpy as np
from jax.experimental.pallas import tpu as pltpu

# The TPU generations the Mosaic kernels compile for; a kernel's VMEM limit must fit the
# smallest VMEM of one TensorCore among them.
TPU_CHIPS = ("TPU_V4", "TPU_V5E", "TPU_V5P", "TPU_V6E", "TPU_7X")
# Mosaic's own scratch (spills, relayouts, internal buffers) on top of what a kernel declares.
MOSAIC_HEADROOM_BYTES = 4 << 20


def check_shapes(
  q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, initial_state: jax.Array
) -> None:
  """Raises ValueError naming the argument whose shape breaks the kernels' contract."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q, k, v must be [batch, seq, heads, dim], got {q.shape}, {k.shape}, {v.shape}"
    )
  batch, seq, heads, key_dim = q.shape
  kv_heads = k.shape[2]
  if k.shape != (batch, seq, kv_heads, key_dim) or kv_heads == 0 or heads % kv_heads:
    raise ValueError(
      f"k must be [batch={batch}, seq={seq}, kv_heads dividing {heads}, key_dim={key_dim}], "
      f"got {k.shape}"
    )
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(
      f"v must be [batch, seq, kv_heads, value_dim] = {k.shape[:3]} + (dv,), got {v.shape}"
    )
  if log_decay.shape not in ((batch, seq, heads, 1), (batch, seq, heads, key_dim)):
    raise ValueError(
      f"log_decay must be [batch, seq, heads, 1 | key_dim] = {(batch, seq, heads)} + (1 or "
      f"{key_dim},), got {log_decay.shape}"
    )
  state_shape = (batch, heads, key_dim, v.shape[3])
  if initial_state.shape != state_shape:
    raise ValueError(
      f"initial_state must be [batch, heads, key_dim, value_dim] = {state_shape}, "
      f"got {initial_state.shape}"
    )


def sum_groups(x: jax.Array, kv_heads: int) -> jax.Array:
  """`[batch, heads, seq, dim]` per query head -> `[batch, kv_heads, seq, dim]`, summed over each
  kv head's group of query heads (the gradient of a kv head shared by its GQA group)."""
  batch, heads, seq, dim = x.shape
  return x.reshape(batch, kv_heads, heads // kv_heads, seq, dim).sum(axis=2)


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
  return math.prod(lead) * -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


def vmem_limit_bytes(
  blocks: Iterable[tuple[tuple[int, ...], object]],
  scratch: Iterable[tuple[tuple[int, ...], object]] = (),
  temporaries: int = 0,
) -> int:
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
