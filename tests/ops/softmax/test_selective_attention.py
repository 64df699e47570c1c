"""`selective_attention` against the paper's formula
`softmax(tau_q(i) q_i . k_j / sqrt(d)) tau_v(j) v_j`, written out densely."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, registry
from attnjax.ops import dot_product_attention, selective_attention
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import (
  causal_allowed,
  logits,
  weighted_values,
)


def _inputs(seed, b=2, t=19, h=6, hk=2, d=60):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))
  q_temp = 1 + jnp.abs(random_normal(keys[3], (b, t, h, 1)))
  v_temp = 1 + jnp.tanh(random_normal(keys[4], (b, t, hk, 1)))
  return q, k, v, q_temp, v_temp


def _paper(q, k, v, q_temp, v_temp):
  """Row i: logits times tau_q(i) (a per-row temperature), values times tau_v(j)."""
  t, h = q.shape[1], q.shape[2]
  s = logits(q, k) * q_temp[..., 0].transpose(0, 2, 1)[..., None]
  s = jnp.where(causal_allowed(t, t), s, -jnp.inf)
  return weighted_values(jax.nn.softmax(s, axis=-1), v * v_temp, h)


@pytest.mark.parametrize("impl,tol", [("reference", TOL_EXACT_F32), ("xla", TOL_BLOCKED_F32)])
def test_matches_formula_values_and_gradients(impl, tol):
  op = functools.partial(selective_attention, mask=masks.causal(), impl=impl)
  assert_matches_reference(op, _paper, _inputs(0), {}, tol, impl)


def test_unit_temperatures_are_softmax_attention():
  q, k, v, q_temp, v_temp = _inputs(1, t=11)
  out = selective_attention(q, k, v, jnp.ones_like(q_temp), None, mask=masks.causal())
  assert_close(out, dot_product_attention(q, k, v, mask=masks.causal()), TOL_EXACT_F32)


def test_registered_variant_is_causal_by_default():
  args = _inputs(2, b=1, t=9)
  out = registry.get("selective")(*args, impl="reference")
  assert_close(out, _paper(*args), TOL_EXACT_F32)


def test_bad_temperatures_name_the_argument():
  q, k, v, q_temp, v_temp = _inputs(3, t=5)
  with pytest.raises(ValueError, match=r"q_temp must be \[batch, q_len, heads, 1\]"):
    selective_attention(q, k, v, q_temp[:, :, :2])
  with pytest.raises(ValueError, match=r"v_temp must be \[batch, kv_len, kv_heads, 1\]"):
    selective_attention(q, k, v, q_temp, jnp.ones((2, 5, 6, 1)))
