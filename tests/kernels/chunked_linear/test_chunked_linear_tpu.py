"""The Mosaic TPU chunked-linear kernel: the TPU interpreter's bounds checks, its chunk rule, the
primal forward that saves no per-chunk states, its VMEM limits and cost estimates (lowering for
TPU runs with the GPU kernel's in test_chunked_linear.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.linear import pallas, reference
from kernels_pallas import tpu_memory
from kernels_pallas.chunked_linear import tpu
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
  assert BlockSizes().chunk == tpu.MIN_CHUNK == 128
  for bad in (0, 8, 40):
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 16"):
      BlockSizes(bad)


def operand_shapes(seq=40, heads=2, kv_heads=1, key_dim=8, value_dim=8, vector=False,
                   dtype=jnp.float32):  # fmt: skip
  """ShapeDtypeStructs of (q, k, v, log_decay, initial_state)."""
  return (
    jax.ShapeDtypeStruct((1, seq, heads, key_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, key_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, value_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, heads, key_dim if vector else 1), jnp.float32),
    jax.ShapeDtypeStruct((1, heads, key_dim, value_dim), jnp.float32),
  )


def kernel_call(block_sizes=None, *, interpret=True):
  def run(q, k, v, log_decay, initial_state):
    return linear_attention(
      q, k, v, log_decay=log_decay, initial_state=initial_state, block_sizes=block_sizes,
      interpret=interpret,
    )  # fmt: skip

  return run


def gradient_of(fn):
  def loss(*operands):
    out, final = fn(*operands)
    return jnp.sum(out) + jnp.sum(final)

  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def pallas_calls(fn, *args):
  """The `pallas_call` equations of `fn`'s jaxpr, nested jaxprs included."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        yield eqn
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          yield from walk(getattr(inner, "jaxpr", inner))

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("chunk_size", [1, 16, 100, 130])
def test_adapter_runs_chunks_of_at_least_128(chunk_size):
  q, k, v, log_decay, initial_state = operand_shapes()

  def run(q, k, v, log_decay, initial_state):
    return pallas.linear_attention(
      q, k, v, log_decay=log_decay, initial_state=initial_state, causal=True,
      chunk_size=chunk_size, interpret=True, kernel="tpu",
    )  # fmt: skip

  (call,) = pallas_calls(run, q, k, v, log_decay, initial_state)
  chunk = call.params["grid_mapping"].block_mappings[0].block_shape[2].block_size
  assert chunk >= tpu.MIN_CHUNK and chunk % tpu.CHUNK_MULTIPLE == 0 and chunk >= chunk_size


@pytest.mark.parametrize("vector", [False, True], ids=["scalar_decay", "vector_decay"])
def test_primal_call_saves_no_per_chunk_states(vector):
  operands = operand_shapes(vector=vector)
  (primal,) = pallas_calls(kernel_call(BlockSizes(16)), *operands)
  assert primal.params["name"] == "chunked_linear_fwd"
  assert [x.aval.ndim for x in primal.outvars] == [4, 4]  # out, final state
  forward, backward = pallas_calls(gradient_of(kernel_call(BlockSizes(16))), *operands)
  assert forward.params["name"] == "chunked_linear_fwd_states"
  assert backward.params["name"] == "chunked_linear_bwd"
  states = forward.outvars[1].aval
  assert states.shape == (1, 2, 40 // 16 + 1, 8, 8) and states.dtype == jnp.float32


def test_every_call_sets_its_vmem_limit_and_cost():
  shapes = operand_shapes(seq=300, key_dim=128, value_dim=128)
  calls = pallas_calls(gradient_of(kernel_call()), *shapes)
  assert len(calls) == 2
  for call in calls:
    limit = call.params["compiler_params"].vmem_limit_bytes
    assert tpu_memory.MOSAIC_HEADROOM_BYTES < limit <= tpu_memory.smallest_tpu_vmem_bytes()
    cost = call.params["cost_estimate"]
    assert cost.flops > 0 and cost.transcendentals > 0 and cost.bytes_accessed > 0


def test_blocks_over_the_smallest_vmem_raise():
  shapes = operand_shapes(seq=2048, key_dim=512, value_dim=512)
  with pytest.raises(ValueError, match="vmem_limit_bytes=.* exceeds the 16777216 bytes"):
    jax.eval_shape(kernel_call(BlockSizes(2048)), *shapes)
