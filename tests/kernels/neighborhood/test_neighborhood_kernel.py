"""The fused neighborhood kernel: interpreter runs, empty rows, shape errors, TPU lowering."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.neighborhood import BlockSizes, reference, window
from attnjax.ops.neighborhood.pallas import fused_attention, tile_schedule
from kernels_pallas.neighborhood import TileSchedule
from kernels_pallas.neighborhood.tpu import tile_sparse_attention
from tests.helpers import assert_close, random_normal

WINDOWS_2D = (window.Neighborhood(5), window.Neighborhood(3, dilation=2, is_causal=True))


def _qkv(seed, shape, kv_heads, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  kv_shape = (*shape[:-2], kv_heads, shape[-1])
  return (
    random_normal(keys[0], shape, dtype),
    random_normal(keys[1], kv_shape, dtype),
    random_normal(keys[2], kv_shape, dtype),
  )


def test_tpu_interpreter_matches_reference():
  q, k, v = _qkv(0, (1, 8, 6, 2, 8), 1)
  run = functools.partial(fused_attention, windows=WINDOWS_2D, scale=0.3)
  out = jax.jit(functools.partial(run, interpret=pltpu.InterpretParams()))(q, k, v)
  ref = reference.attention(q, k, v, windows=WINDOWS_2D, scale=0.3)
  assert_close(out, ref, 1e-4, "InterpretParams forward")


def _schedule_with_empty_rows():
  """Two tiles of 4 rows; rows 1 and 2 of tile 0 see nothing, tile 1 sees both tiles."""
  table = np.zeros((3, 4, 4), bool)
  table[1] = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  table[2] = np.ones((4, 4), bool)
  return TileSchedule(
    kv_tiles=np.array([[0, 0], [0, 1]], np.int32),
    kv_counts=np.array([1, 2], np.int32),
    mask_ids=np.array([[1, 0], [2, 2]], np.int32),
    q_tiles=np.array([[0, 1], [1, 1]], np.int32),
    q_counts=np.array([2, 1], np.int32),
    mask_ids_t=np.array([[1, 2], [2, 0]], np.int32),
    mask_table=table,
  )


def test_rows_without_keys_are_zero_with_finite_gradients():
  schedule = _schedule_with_empty_rows()
  q, k, v = (x.transpose(0, 2, 1, 3) for x in _qkv(1, (1, 8, 2, 16), 2))
  run = functools.partial(tile_sparse_attention, schedule=schedule, scale=0.25, interpret=True)
  out, grads = jax.jit(jax.value_and_grad(lambda *a: (run(*a) ** 2).sum(), argnums=(0, 1, 2)))(
    q, k, v
  )
  rows = run(q, k, v)
  np.testing.assert_array_equal(rows[:, :, 1:3], 0.0)
  for g in grads:
    assert np.all(np.isfinite(g))
  # Dense check of the same mask.
  dense = np.zeros((8, 8), bool)
  dense[0:4, 0:4] = schedule.mask_table[1]
  dense[4:8, :] = True
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
  probs = jax.nn.softmax(jnp.where(dense, logits, -jnp.inf), -1)
  expected = jnp.where(
    dense.any(-1)[:, None], jnp.einsum("bhqk,bhkd->bhqd", jnp.nan_to_num(probs), v), 0
  )
  assert_close(rows, expected, 1e-5, "tile-sparse forward")


@pytest.mark.parametrize(
  "shapes, message",
  [
    (((1, 2, 12, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "q must be"),
    (((1, 2, 8, 16), (1, 2, 8, 8), (1, 2, 8, 16)), "k must be"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)), "v must be"),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "multiple"),
  ],
)
def test_bad_shapes_raise(shapes, message):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(ValueError, match=message):
    tile_sparse_attention(q, k, v, _schedule_with_empty_rows(), scale=1.0, interpret=True)


def test_schedule_validates_its_arrays():
  lists = np.zeros((2, 1), np.int32)
  counts = np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="mask_table"):
    TileSchedule(lists, counts, lists, lists, counts, lists, np.zeros((2, 4, 3), bool))
  with pytest.raises(ValueError, match="q_tiles"):
    TileSchedule(lists, counts, lists, lists[:1], counts, lists, np.zeros((2, 4, 4), bool))


def test_schedule_of_a_plan_is_cached():
  plan = window.tile_plan((16, 16), WINDOWS_2D, (8, 8))
  assert tile_schedule(plan) is tile_schedule(plan)
  assert tile_schedule(plan).tile_size == 64


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_tpu_forward_and_gradient(dtype):
  windows = (window.Neighborhood(7), window.Neighborhood(5, dilation=2))
  q = jax.ShapeDtypeStruct((2, 16, 24, 4, 64), dtype)
  kv = jax.ShapeDtypeStruct((2, 16, 24, 2, 64), dtype)
  run = functools.partial(fused_attention, windows=windows, scale=0.125)
  forward = jax.export.export(jax.jit(run), platforms=["tpu"])(q, kv, kv)
  assert "tpu_custom_call" in forward.mlir_module()

  def loss(q, k, v):
    return run(q, k, v).astype(jnp.float32).sum()

  grads = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])
  assert grads(q, kv, kv).mlir_module().count("tpu_custom_call") >= 3


@pytest.mark.parametrize(
  "spatial, windows",
  [
    ((300,), (window.Neighborhood(33, is_causal=True),)),
    ((8, 8, 16), (window.Neighborhood(3),) * 3),
  ],
  ids=["1d_causal", "3d"],
)
def test_lowers_for_tpu_in_1d_and_3d(spatial, windows):
  q = jax.ShapeDtypeStruct((1, *spatial, 2, 128), jnp.bfloat16)
  run = functools.partial(fused_attention, windows=windows, scale=0.1)

  def loss(q):
    return run(q, q, q).astype(jnp.float32).sum()

  exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(q)
  assert "tpu_custom_call" in exported.mlir_module()


def test_kernel_tiles_keep_rows_a_multiple_of_8():
  assert BlockSizes((4, 4, 8)).fit((5, 3, 7), last_multiple=8) == (4, 3, 8)
  assert BlockSizes((128,)).fit((37,), last_multiple=8) == (40,)
  assert BlockSizes((8, 8)).fit((5, 3)) == (5, 3)
