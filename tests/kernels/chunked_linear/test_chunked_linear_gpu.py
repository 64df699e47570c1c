"""The Triton GPU chunked-linear kernel: its tile and launch rules, and the sub-chunk
factorization of a per-channel decay (lowering for CUDA runs with the TPU kernel's in
test_chunked_linear.py)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from kernels_pallas.chunked_linear import gpu
from kernels_pallas.chunked_linear.gpu import BlockSizes
from tests.helpers import tolerance
from tests.kernels.chunked_linear.test_chunked_linear import check, make_inputs


def test_block_sizes_are_validated():
  assert BlockSizes() == BlockSizes(
    chunk=64, sub_chunk=16, block_value=64, num_warps=4, num_stages=2
  )
  for bad in (0, 8, 24, 48):
    with pytest.raises(ValueError, match="chunk must be a power of two >= 16"):
      BlockSizes(chunk=bad)
  with pytest.raises(ValueError, match="sub_chunk must be a power of two >= 16"):
    BlockSizes(sub_chunk=8)
  with pytest.raises(ValueError, match="sub_chunk=64 must be <= chunk=32"):
    BlockSizes(chunk=32, sub_chunk=64)
  with pytest.raises(ValueError, match="block_value must be a power of two >= 16"):
    BlockSizes(block_value=40)
  with pytest.raises(ValueError, match="num_warps"):
    BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match="num_stages"):
    BlockSizes(num_stages=0)


def test_default_block_sizes_narrow_for_wide_float32_rows():
  assert gpu.default_block_sizes(64) == BlockSizes()
  assert gpu.default_block_sizes(100) == BlockSizes(block_value=32)  # pads to 128: 512 B
  assert gpu.default_block_sizes(256) == BlockSizes(chunk=32, block_value=32)
  assert gpu.default_block_sizes(256, chunk=16) == BlockSizes(chunk=16, block_value=32)


# (chunk, sub_chunk, dtype, decay strength): 4 and 2 sub-chunks per chunk, so the off-diagonal
# sub-chunk pairs run as matmuls; strength 16 puts the cumulative log decay of a chunk near
# -1000, where a chunk-wide `k e^{-G}` factor would overflow float32.
SUB_CHUNKS = {
  "chunk64-sub16": (64, 16, jnp.float32, 1.0),
  "chunk64-sub16-strong-decay": (64, 16, jnp.float32, 16.0),
  "chunk32-sub16-bf16": (32, 16, jnp.bfloat16, 1.0),
}


@pytest.mark.parametrize("case", SUB_CHUNKS.values(), ids=SUB_CHUNKS.keys())
def test_vector_decay_sub_chunks_match_the_recurrence(case):
  chunk, sub_chunk, dtype, strength = case
  operands = make_inputs(
    7, seq=150, heads=4, kv_heads=2, key_dim=20, value_dim=24, decay_kind="vector",
    dtype=dtype, strength=strength,
  )  # fmt: skip
  block_sizes = BlockSizes(chunk=chunk, sub_chunk=sub_chunk, block_value=16)
  run = functools.partial(gpu.linear_attention, block_sizes=block_sizes, interpret=True)
  check(run, operands, tolerance(dtype), True, f"chunk {chunk}, sub-chunk {sub_chunk}")
