"""The Mosaic TPU chunked-linear kernel: the TPU interpreter's bounds checks and its chunk rule
(lowering for TPU runs with the GPU kernel's in test_chunked_linear.py)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.linear import reference
from kernels_pallas.chunked_linear.tpu import BlockSizes, linear_attention
from tests.helpers import TOL_BLOCKED_F32, assert_matches_reference


def test_tpu_interpreter_matches_reference_with_gradients():
  # Vector decay: its per-row dynamic slicing is what the interpreter's bounds checks guard.
  batch, seq, heads, kv_heads, key_dim, value_dim = 1, 20, 2, 1, 8, 8
  rng = np.random.default_rng(0)
  q, k, v = (
    jnp.asarray(rng.standard_normal((batch, seq, h, d)), jnp.float32)
    for h, d in ((heads, key_dim), (kv_heads, key_dim), (kv_heads, value_dim))
  )
  state = dict(
    log_decay=jnp.asarray(-np.logaddexp(0.0, rng.standard_normal(q.shape)), jnp.float32),
    initial_state=jnp.asarray(rng.uniform(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )
  kernel = functools.partial(
    linear_attention, block_sizes=BlockSizes(16), interpret=pltpu.InterpretParams()
  )
  oracle = functools.partial(reference.linear_attention, causal=True, chunk_size=16)
  assert_matches_reference(kernel, oracle, (q, k, v), state, TOL_BLOCKED_F32, "InterpretParams")


def test_block_sizes_are_validated():
  assert BlockSizes().chunk == 64
  for bad in (0, 8, 40):
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 16"):
      BlockSizes(bad)
