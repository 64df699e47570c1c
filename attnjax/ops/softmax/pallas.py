"""`impl="pallas"` / `"pallas_interpret"`: the block-sparse Pallas kernel behind the op's API.

Builds the BlockMask for the kernel's tile sizes (outside jit, cached), converts it to the
kernel's `MaskInfo`, and calls `kernels_pallas.block_sparse`. On TPU the Mosaic kernel runs;
`pallas_interpret` runs the same kernel in the Pallas interpreter on any backend (CI: CPU).
Other backends raise `registry.Unsupported`, so `impl="auto"` falls back to `xla`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from attnjax import masks as masks_lib
from attnjax import registry
from attnjax.ops.softmax.blockwise import BlockSizes
from kernels_pallas import block_sparse

DEFAULT_BLOCKS = BlockSizes(512, 512)


@functools.lru_cache(maxsize=64)
def mask_info(mask, q_len, kv_len, block_q, block_kv, q_offset) -> block_sparse.MaskInfo:
  """The kernel's tile lists for `mask` (forward and transposed)."""
  bm = masks_lib.block_mask(mask, q_len, kv_len, block_q, block_kv, q_offset=q_offset)
  t = bm.transpose()
  return block_sparse.MaskInfo(
    counts=bm.kv_counts,
    indices=bm.kv_indices,
    kinds=bm.kv_kinds.astype(np.int32),
    partial_ids=bm.partial_ids,
    t_counts=t.kv_counts,
    t_indices=t.kv_indices,
    t_kinds=t.kv_kinds.astype(np.int32),
    t_partial_ids=t.partial_ids,
    tiles=bm.partial_tiles.astype(np.int8),
    block_q=block_q,
    block_kv=block_kv,
  )


def attention(
  q,
  k,
  v,
  *,
  shape,
  mask,
  segment_ids,
  scale,
  softcap,
  sinks,
  q_offset,
  block_sizes=None,
  interpret=False,
):
  """Same function and arguments as `reference.attention`, computed by the Pallas kernel."""
  if not interpret and jax.default_backend() != "tpu":
    raise registry.Unsupported(
      f"the block-sparse Pallas kernel targets TPU; backend is {jax.default_backend()!r} "
      "(use impl='pallas_interpret' to run it in the interpreter)"
    )
  blocks = (block_sizes or DEFAULT_BLOCKS).fit(shape.q_len, shape.kv_len)
  info = mask_info(mask, shape.q_len, shape.kv_len, blocks.block_q, blocks.block_kv, q_offset)
  return block_sparse.block_sparse_attention(
    q,
    k,
    v,
    info,
    scale=scale,
    softcap=softcap,
    segment_ids=None if segment_ids is None else (segment_ids.q, segment_ids.kv_ids),
    padding_id=None if segment_ids is None else segment_ids.padding_id,
    sinks=sinks,
    interpret=interpret,
  )


interpreted = functools.partial(attention, interpret=True)
