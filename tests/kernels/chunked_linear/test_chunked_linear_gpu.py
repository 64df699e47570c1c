"""The Triton GPU chunked-linear kernel: its tile and launch rules (lowering for CUDA runs with
the TPU kernel's in test_chunked_linear.py)."""

from __future__ import annotations

import pytest

from kernels_pallas.chunked_linear.gpu import BlockSizes


def test_block_sizes_are_validated():
  assert BlockSizes() == BlockSizes(chunk=64, block_value=64, num_warps=4, num_stages=1)
  for bad in (0, 8, 24, 48):
    with pytest.raises(ValueError, match="chunk must be a power of two >= 16"):
      BlockSizes(chunk=bad)
  with pytest.raises(ValueError, match="block_value must be a power of two >= 16"):
    BlockSizes(block_value=40)
  with pytest.raises(ValueError, match="num_warps"):
    BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match="num_stages"):
    BlockSizes(num_stages=0)
