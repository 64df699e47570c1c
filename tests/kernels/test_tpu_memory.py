"""The Mosaic kernels' shared VMEM budget (`kernels_pallas.tpu_memory`)."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tpu_memory


def test_vmem_bytes_pad_to_whole_tiles():
  assert tpu_memory.vmem_bytes((128, 1), jnp.float32) == 128 * 128 * 4
  assert tpu_memory.vmem_bytes((2, 20, 130), jnp.bfloat16) == 2 * 32 * 256 * 2
  assert tpu_memory.vmem_bytes((5,), jnp.int32) == 8 * 128 * 4


def test_limit_counts_double_buffered_blocks_scratch_temporaries_and_headroom():
  # 2 x 32 KiB bf16 block + 64 KiB scratch + 300 KiB temporaries + 4 MiB headroom -> 5 MiB
  blocks, scratch = [((128, 128), jnp.bfloat16)], [((128, 128), jnp.float32)]
  limit = tpu_memory.vmem_limit_bytes(blocks, scratch, temporaries=300 << 10)
  assert limit == 5 << 20
  assert tpu_memory.vmem_limit_bytes(blocks, scratch) == 5 << 20  # still rounds up to MiB
  assert tpu_memory.vmem_limit_bytes([], []) == tpu_memory.MOSAIC_HEADROOM_BYTES


def test_a_limit_over_the_smallest_vmem_raises():
  capacity = tpu_memory.smallest_tpu_vmem_bytes()
  assert capacity == 16 << 20  # v4's
  with pytest.raises(ValueError, match=r"vmem_limit_bytes=\d+ .* exceeds the 16777216 bytes"):
    tpu_memory.vmem_limit_bytes([((2048, 1024), jnp.float32)])


def test_compiler_params_count_blocked_specs_only():
  x = jax.ShapeDtypeStruct((4, 256, 128), jnp.float32)
  blocked = pl.BlockSpec((pl.Squeezed(), 256, 128), lambda i: (i, 0, 0))  # 128 KiB
  whole = pl.BlockSpec(memory_space=pltpu.SMEM)
  assert tpu_memory.spec_blocks([blocked, whole], [x, x]) == [((256, 128), x.dtype)]
  params = tpu_memory.compiler_params(
    ("parallel",), [blocked, whole], [x, x], [blocked], [x], [pltpu.VMEM((256, 128), jnp.float32)]
  )
  assert params.dimension_semantics == ("parallel",)
  assert params.vmem_limit_bytes == 5 << 20  # 4 x 128 KiB blocks + 128 KiB scratch + 4 MiB
