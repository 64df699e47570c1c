"""The Mosaic TPU neighborhood kernel: the TPU interpreter, TPU lowering, its tile rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.neighborhood import BlockSizes, reference, window
from attnjax.ops.neighborhood.pallas import fused_attention
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
