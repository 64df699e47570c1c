"""The tolerance float32 inputs need on a GPU, where the kernels' float32 tile matmuls run in TF32
under JAX's default matmul precision (`tests/hardware/test_gpu_compile.py` finds the TF32 MMA
in the compiled PTX; under "highest" there is none and the float32 tolerances hold).

The interpreter computes float32 matmuls exactly, so each GPU kernel runs here with its tile
matmuls' operands rounded to TF32 (10 mantissa bits, what the tensor cores read) and is compared
with the float32 reference: it passes at `TOL_TF32` and would fail at the float32 tolerance the
interpreted tests use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from attnjax import masks
from attnjax.ops.linear import reference as linear_reference
from attnjax.ops.neighborhood import pallas as neighborhood_pallas
from attnjax.ops.neighborhood import reference as neighborhood_reference
from attnjax.ops.neighborhood import window
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import pallas as softmax_pallas
from attnjax.ops.softmax import reference as softmax_reference
from kernels_pallas import common
from kernels_pallas.chunked_linear import gpu as chunked_linear_gpu
from tests.helpers import TOL_BLOCKED_F32, assert_matches_reference, random_normal, rel_error
from tests.kernels.chunked_linear.test_chunked_linear import make_inputs
from tests.kernels.delta_rule.test_delta_rule_kernels import _op as delta_rule_op
from tests.ops.delta.test_delta_rule import _inputs as delta_rule_inputs

# Measured on these cases: outputs 2e-4 to 4e-4 from the reference, gradients up to 1.7e-3 (of
# the chunked-linear initial state). Hardware float32 tests at the default precision need this
# (gradients twice it), not the interpreter's 1e-4.
TOL_TF32 = 2e-3


def _tf32_dot(exact_dot):
  def dot(a, b, *, dtype, precision=None, **transposes):
    if jnp.dtype(dtype) == jnp.float32 and precision is None:
      a, b = (
        lax.reduce_precision(x.astype(dtype), exponent_bits=8, mantissa_bits=10) for x in (a, b)
      )
    return exact_dot(a, b, dtype=dtype, precision=precision, **transposes)

  return dot


@pytest.fixture
def tf32_tile_matmuls():
  """The GPU kernels' `common.dot` rounds float32 operands to TF32 for this test."""
  exact = common.dot
  common.dot = _tf32_dot(exact)
  jax.clear_caches()  # kernels traced with the exact dot must not be reused
  try:
    yield
  finally:
    common.dot = exact
    jax.clear_caches()


def _block_sparse():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = random_normal(keys[0], (2, 77, 4, 64))
  k, v = (random_normal(key, (2, 77, 2, 64)) for key in keys[1:3])
  options = dict(mask=masks.causal(), segment_ids=None, softcap=None, q_offset=0, scale=0.125)
  shape = check_qkv(q, k, v)
  fn = functools.partial(
    softmax_pallas.attention, shape=shape, block_sizes=None, interpret=True, kernel="gpu",
    **options,
  )  # fmt: skip
  ref = functools.partial(softmax_reference.attention, shape=shape, **options)
  return fn, ref, (q, k, v), {"sinks": random_normal(keys[3], (4,))}


def _neighborhood():
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = random_normal(keys[0], (1, 13, 11, 4, 32))
  k, v = (random_normal(key, (1, 13, 11, 2, 32)) for key in keys[1:])
  options = dict(windows=(window.Neighborhood(5), window.Neighborhood(3, dilation=2)), scale=0.2)
  fn = functools.partial(
    neighborhood_pallas.attention_interpret, block_sizes=None, kernel="gpu", **options
  )
  return fn, functools.partial(neighborhood_reference.attention, **options), (q, k, v), {}


def _chunked_linear():
  operands = make_inputs(2, seq=45, key_dim=32, value_dim=24, decay_kind="scalar")
  fn = functools.partial(
    chunked_linear_gpu.linear_attention,
    block_sizes=chunked_linear_gpu.BlockSizes(chunk=16, block_value=16),
    interpret=True, causal=True,
  )  # fmt: skip
  ref = functools.partial(linear_reference.linear_attention, causal=True, chunk_size=1)
  state = dict(log_decay=operands["log_decay"], initial_state=operands["initial_state"])
  return fn, ref, (operands["q"], operands["k"], operands["v"]), state


def _delta_rule():
  args, kwargs = delta_rule_inputs(3, gated_decay=True, seq=37, heads=4, kv_heads=2)
  return delta_rule_op("gpu", 8), delta_rule_op(None, 8), args, kwargs


CASES = {
  "block_sparse": _block_sparse,
  "neighborhood": _neighborhood,
  "chunked_linear": _chunked_linear,
  "delta_rule": _delta_rule,
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_tf32_tile_matmuls_need_the_tf32_tolerance(case, tf32_tile_matmuls):
  fn, ref, args, kwargs = case()
  assert_matches_reference(fn, ref, args, kwargs, TOL_TF32, "TF32 tile matmuls")
  out = jax.tree.leaves(jax.jit(fn)(*args, **kwargs))[0]
  error = rel_error(out, jax.tree.leaves(ref(*args, **kwargs))[0])
  assert error > TOL_BLOCKED_F32, f"TF32 rounding moved the output by only {error:.2g}"
