"""`benchmarks/dma_counts.count` on toy kernels whose copies can be counted by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from benchmarks import dma_counts

INTERPRET = pltpu.InterpretParams()


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def test_counts_a_block_once_per_change_of_its_index():
  """Grid (rows 4, repeats 3): x's block depends on the row only, so each row's block is read
  once; the output's block is the same for the 3 repeats, so it is written once per row."""
  x = jnp.arange(512 * 256, dtype=jnp.float32).reshape(512, 256)
  block = pl.BlockSpec((128, 256), lambda i, r: (i, 0))

  def double(x):
    return pl.pallas_call(
      _copy_kernel,
      grid=(4, 3),
      in_specs=[block],
      out_specs=block,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      interpret=INTERPRET,
      name="double",
    )(x)

  counts = dma_counts.count(double, x)
  (call,) = counts.per_call
  assert call.name.startswith("double") and call.grid == (4, 3)
  assert counts.grid_steps == 12
  assert counts.hbm_to_vmem_bytes == counts.vmem_to_hbm_bytes == x.nbytes
  assert sum(call.hbm_to_vmem_by_operand.values()) == x.nbytes


def test_counts_a_block_that_never_changes_once():
  x = jnp.ones((128, 128), jnp.bfloat16)
  out_spec = pl.BlockSpec((128, 128), lambda i: (i, 0))

  def broadcast(x):
    return pl.pallas_call(
      _copy_kernel,
      grid=(5,),
      in_specs=[pl.BlockSpec((128, 128), lambda i: (0, 0))],
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((640, 128), x.dtype),
      interpret=INTERPRET,
    )(x)

  counts = dma_counts.count(broadcast, x)
  assert counts.grid_steps == 5
  assert counts.hbm_to_vmem_bytes == x.nbytes
  assert counts.vmem_to_hbm_bytes == 5 * x.nbytes


def _dma_kernel(x_hbm, o_ref, scratch, sem):
  half = x_hbm.shape[0] // 2
  copy = pltpu.make_async_copy(x_hbm.at[pl.ds(pl.program_id(0) * half, half)], scratch, sem)
  copy.start()
  copy.wait()
  o_ref[...] = scratch[...] + 1


def test_counts_explicit_dmas_and_scalar_prefetch():
  x = jnp.ones((256, 128), jnp.float32)
  offsets = jnp.zeros((7,), jnp.int32)

  def add_one(offsets, x):
    return pl.pallas_call(
      _dma_kernel_with_offsets,
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(2,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((128, 128), lambda i, _: (i, 0)),
        scratch_shapes=[pltpu.VMEM((128, 128), jnp.float32), pltpu.SemaphoreType.DMA],
      ),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      interpret=INTERPRET,
    )(offsets, x)

  counts = dma_counts.count(add_one, offsets, x)
  (call,) = counts.per_call
  assert call.hbm_to_vmem_by_operand == {"dma": x.nbytes}
  assert counts.vmem_to_hbm_bytes == x.nbytes
  assert call.scalar_prefetch_bytes == offsets.nbytes


def _dma_kernel_with_offsets(offsets_ref, x_hbm, o_ref, scratch, sem):
  del offsets_ref
  _dma_kernel(x_hbm, o_ref, scratch, sem)


def test_adds_up_repeated_calls():
  """Identical calls are lowered once, so they share one record that counts both runs."""
  x = jnp.ones((256, 128), jnp.float32)
  spec = pl.BlockSpec((128, 128), lambda i: (i, 0))

  def twice(x):
    call = pl.pallas_call(
      _copy_kernel, grid=(2,), in_specs=[spec], out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=INTERPRET,
    )  # fmt: skip
    return call(call(x))

  counts = dma_counts.count(jax.jit(twice), x)
  assert counts.grid_steps == 4
  assert counts.hbm_to_vmem_bytes == 2 * x.nbytes
  np.testing.assert_array_equal(jax.jit(twice)(x), 4 * x)
