"""The Mosaic TPU neighborhood kernel: the TPU interpreter, TPU lowering, its tile rule, its GQA
block sharing, lane-dense hot loop, VMEM limits and cost estimates."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.neighborhood import BlockSizes, reference, window
from attnjax.ops.neighborhood.pallas import fused_attention
from kernels_pallas.tpu_memory import smallest_tpu_vmem_bytes
from tests.helpers import assert_close, random_normal

WINDOWS_2D = (window.Neighborhood(5), window.Neighborhood(3, dilation=2, is_causal=True))


def test_tpu_interpreter_matches_reference():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = random_normal(keys[0], (1, 8, 6, 2, 8))
  k, v = (random_normal(key, (1, 8, 6, 1, 8)) for key in keys[1:])
  run = functools.partial(fused_attention, windows=WINDOWS_2D, scale=0.3)
  out = jax.jit(functools.partial(run, interpret=pltpu.InterpretParams()))(q, k, v)
  ref = reference.attention(q, k, v, windows=WINDOWS_2D, scale=0.3)
  assert_close(out, ref, 1e-4, "InterpretParams forward")


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


def kernel_shapes(spatial=(16, 24), heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32):
  """ShapeDtypeStructs of (q, k, v) for `fused_attention`."""
  q = jax.ShapeDtypeStruct((1, *spatial, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((1, *spatial, kv_heads, head_dim), dtype)
  return q, kv, kv


def gradient_of(fn):
  def loss(q, k, v):
    return fn(q, k, v).astype(jnp.float32).sum()

  return jax.grad(loss, argnums=(0, 1, 2))


def pallas_calls(fn, *args):
  """name -> the `pallas_call` equation of `fn`'s jaxpr (nested jaxprs included)."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        yield eqn
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          yield from walk(getattr(inner, "jaxpr", inner))

  return {eqn.params["name"]: eqn for eqn in walk(jax.make_jaxpr(fn)(*args).jaxpr)}


def block_shapes(eqn):
  return [
    tuple(getattr(d, "block_size", None) for d in block.block_shape)
    for block in eqn.params["grid_mapping"].block_mappings
  ]


def test_a_gqa_group_shares_each_kv_block():
  """Forward and dq grids run over kv heads; their query blocks hold the whole group."""
  run = functools.partial(fused_attention, windows=WINDOWS_2D, scale=0.3, interpret=True)
  calls = pallas_calls(gradient_of(run), *kernel_shapes(heads=6, kv_heads=2))
  assert set(calls) == {"neighborhood_fwd", "neighborhood_dq", "neighborhood_dkv"}
  for name in ("neighborhood_fwd", "neighborhood_dq"):
    grid = calls[name].params["grid_mapping"].grid
    q_block = block_shapes(calls[name])[0]
    assert grid[1] == 2 and q_block[2] == 3, name  # 2 kv heads, 3 query heads per block


def test_the_dkv_hot_loop_moves_no_lane_width_1_blocks():
  """lse and delta reach the per-step dk/dv kernel as `[1, T]` rows."""
  run = functools.partial(fused_attention, windows=WINDOWS_2D, scale=0.3, interpret=True)
  dkv = pallas_calls(gradient_of(run), *kernel_shapes())["neighborhood_dkv"]
  assert all(shape[-1] != 1 for shape in block_shapes(dkv))


def test_every_call_sets_its_vmem_limit_and_cost():
  run = functools.partial(fused_attention, windows=WINDOWS_2D, scale=0.3, interpret=True)
  for name, call in pallas_calls(gradient_of(run), *kernel_shapes()).items():
    limit = call.params["compiler_params"].vmem_limit_bytes
    assert 0 < limit <= smallest_tpu_vmem_bytes(), name
    cost = call.params["cost_estimate"]
    assert cost.flops > 0 and cost.transcendentals > 0 and cost.bytes_accessed > 0, name


def test_blocks_over_the_smallest_vmem_raise():
  windows = (window.Neighborhood(3),)
  run = functools.partial(
    fused_attention, windows=windows, scale=0.1, block_sizes=BlockSizes((1024,)), interpret=True
  )
  shapes = kernel_shapes(spatial=(1024,), heads=8, kv_heads=1, head_dim=256)
  with pytest.raises(ValueError, match="vmem_limit_bytes=.* exceeds the 16777216 bytes"):
    jax.eval_shape(run, *shapes)
