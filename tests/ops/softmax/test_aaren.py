"""`aaren` (attention as an RNN) against causal softmax attention with one fixed query."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.ops import aaren, aaren_init_state, aaren_step, dot_product_attention
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import softmax_attention


def _inputs(seed, b=2, t=17, h=6, hk=2, d=60, dv=12):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = random_normal(keys[0], (b, 1, h, d))
  k = 2 * random_normal(keys[1], (b, t, hk, d))  # peaked weights: max tracking matters
  v = random_normal(keys[2], (b, t, hk, dv))
  return q, k, v


_scan = jax.jit(functools.partial(aaren, impl="xla"))


def _paper(q, k, v):
  """o_t = softmax_{j <= t}(q . k_j / sqrt(d)) v_j: the same query at every step."""
  return softmax_attention(jnp.broadcast_to(q, (q.shape[0], k.shape[1], *q.shape[2:])), k, v)


@pytest.mark.parametrize("impl,tol", [("reference", TOL_EXACT_F32), ("xla", TOL_BLOCKED_F32)])
def test_matches_formula_values_and_gradients(impl, tol):
  assert_matches_reference(functools.partial(aaren, impl=impl), _paper, _inputs(0), {}, tol, impl)


def test_equals_causal_softmax_attention_with_a_fixed_query():
  q, k, v = _inputs(1, t=23, hk=3, h=3, d=16)
  fixed = jnp.broadcast_to(q, (2, 23, 3, 16))
  expected = dot_product_attention(fixed, k, v, mask=masks.causal(), impl="reference")
  assert_close(_scan(q, k, v), expected, TOL_BLOCKED_F32)


def test_segments_restart_the_recurrence():
  q, k, v = _inputs(2, b=1, t=11)
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 5, 5, 5, 5]])
  out = _scan(q, k, v, segment_ids=segment_ids)
  for lo, hi in ((0, 3), (3, 7), (7, 11)):
    assert_close(out[:, lo:hi], _paper(q, k[:, lo:hi], v[:, lo:hi]), TOL_BLOCKED_F32, f"{lo}:{hi}")
  ref = jax.jit(functools.partial(aaren, impl="reference"))(q, k, v, segment_ids=segment_ids)
  assert_close(out, ref, TOL_BLOCKED_F32, "xla vs reference")


def test_streaming_steps_equal_the_parallel_scan():
  q, k, v = _inputs(3, t=9)
  step = jax.jit(aaren_step)
  state = aaren_init_state(2, q.shape[2], v.shape[3])
  outs = []
  for t in range(k.shape[1]):
    o_t, state = step(state, q, k[:, t : t + 1], v[:, t : t + 1])
    outs.append(o_t)
  assert_close(jnp.concatenate(outs, axis=1), _scan(q, k, v), TOL_BLOCKED_F32)
  assert [s.shape for s in state] == [(2, 6), (2, 6), (2, 6, 12)]  # constant in t


def test_bad_inputs_name_the_argument():
  q, k, v = _inputs(4, t=5)
  with pytest.raises(ValueError, match=r"q must be \[batch, 1, heads, head_dim\]"):
    aaren(jnp.concatenate([q, q], axis=1), k, v)
  with pytest.raises(ValueError, match="segment_ids must be"):
    aaren(q, k, v, segment_ids=np.zeros((2, 4), np.int32))
  with pytest.raises(ValueError, match="state.numer must have shape"):
    state = aaren_init_state(2, 6, 5)
    aaren_step(state, q, k[:, :1], v[:, :1])
