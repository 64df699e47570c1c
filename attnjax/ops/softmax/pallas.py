"""`impl="pallas"` / `"pallas_interpret"`: the block-sparse Pallas kernels behind the op's API.

Builds the BlockMask for the kernel's tile sizes (outside jit, cached), converts it to the
kernel's `MaskInfo`, and calls `kernels_pallas.block_sparse`: the Mosaic kernel (`kernel="tpu"`)
or the Triton kernel (`kernel="gpu"`); `registry.dispatch` picks the one of the platform the
program is compiled for. `pallas_interpret` runs the TPU kernel in the Pallas interpreter on any
backend (CI: CPU). The kernels are not auto-partitioned by XLA: inside `shard_map` (sequence
parallelism) they run on each shard's local arrays.
"""

from __future__ import annotations

import functools

import numpy as np

from attnjax import masks as masks_lib
from attnjax.ops.softmax.blockwise import BlockSizes
from kernels_pallas import block_sparse, common, triton

DEFAULT_BLOCKS = {"tpu": BlockSizes(512, 512), "gpu": BlockSizes(64, 64)}
# A TPU row of q/k/v wider than this many bytes (head_dim 256 in float32) halves the default
# tiles: the dk/dv kernel's double-buffered [512, 256] f32 blocks and [512, 512] temporaries
# need 17 MiB, over v4's 16 MiB of VMEM (the smallest; the kernel checks its limit).
TPU_WIDE_ROW_BYTES = 512
TPU_WIDE_ROW_BLOCKS = BlockSizes(256, 256)
# On GPUs the same rows (wider than `triton.WIDE_ROW_BYTES`) take 32-row tiles: at 64 the
# pipelined K/V tiles of the forward kernel ask an A100 for 217 KB of its 163 KB of shared memory.
GPU_WIDE_ROW_BLOCKS = BlockSizes(32, 32)
KERNELS = {
  "tpu": block_sparse.tpu.block_sparse_attention,
  "gpu": block_sparse.gpu.block_sparse_attention,
}


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
  kernel="tpu",
):
  """Same function and arguments as `reference.attention`, computed by the Pallas `kernel`
  ("tpu": Mosaic, "gpu": Triton)."""
  common.check_kernel(kernel)
  blocks = block_sizes or _default_blocks(kernel, q)
  if kernel == "gpu":  # Triton tiles are powers of two
    blocks = BlockSizes(
      min(blocks.block_q, common.next_power_of_two(shape.q_len, at_least=triton.MIN_DOT)),
      min(blocks.block_kv, common.next_power_of_two(shape.kv_len, at_least=triton.MIN_DOT)),
    )
  else:
    blocks = blocks.fit(shape.q_len, shape.kv_len)
  info = mask_info(mask, shape.q_len, shape.kv_len, blocks.block_q, blocks.block_kv, q_offset)
  return KERNELS[kernel](
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


def _default_blocks(kernel: str, q) -> BlockSizes:
  row_bytes = q.shape[-1] * q.dtype.itemsize
  if kernel == "tpu" and row_bytes > TPU_WIDE_ROW_BYTES:
    return TPU_WIDE_ROW_BLOCKS
  gpu_row_bytes = common.next_power_of_two(q.shape[-1]) * q.dtype.itemsize
  if kernel == "gpu" and gpu_row_bytes > triton.WIDE_ROW_BYTES:
    return GPU_WIDE_ROW_BLOCKS
  return DEFAULT_BLOCKS[kernel]


interpreted = functools.partial(attention, interpret=True)
