"""`gated_attention` against the paper's formula `sigmoid(x W) * softmax(q k^T / sqrt(d)) v`."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, registry
from attnjax.ops import dot_product_attention, gated_attention
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import softmax_attention


def _inputs(seed, b, t, h, hk, d, gate_dim):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = random_normal(keys[0], (b, t, h, d))
  k = random_normal(keys[1], (b, t, hk, d))
  v = random_normal(keys[2], (b, t, hk, d))
  gate = jax.nn.sigmoid(random_normal(keys[3], (b, t, h, gate_dim)))
  return q, k, v, gate


def _paper(q, k, v, gate):
  return gate * softmax_attention(q, k, v, causal=True)


@pytest.mark.parametrize(
  "impl,tol,form",
  [
    ("reference", TOL_EXACT_F32, "elementwise"),
    ("xla", TOL_BLOCKED_F32, "elementwise"),
    ("xla", TOL_BLOCKED_F32, "headwise"),
  ],
)
def test_matches_formula_values_and_gradients(impl, tol, form):
  b, t, h, hk, d = 2, 19, 6, 2, 60
  args = _inputs(0, b, t, h, hk, d, 1 if form == "headwise" else d)
  op = functools.partial(gated_attention, mask=masks.causal(), impl=impl)
  assert_matches_reference(op, _paper, args, {}, tol, f"{impl} {form}")


@hypothesis.settings(max_examples=3)
@hypothesis.given(
  t=st.integers(1, 23), kv_heads=st.sampled_from([1, 3]), groups=st.sampled_from([1, 2])
)
def test_xla_equals_reference_over_shapes(t, kv_heads, groups):
  args = _inputs(t, 1, t, kv_heads * groups, kv_heads, 12, 12)
  ref, fast = (
    jax.jit(functools.partial(registry.get("gated"), impl=impl))(*args)
    for impl in ("reference", "xla")
  )
  assert_close(fast, ref, TOL_BLOCKED_F32, f"t={t}")


def test_gate_of_one_is_softmax_attention():
  q, k, v, _ = _inputs(1, 2, 11, 4, 4, 16, 1)
  ones = jnp.ones((2, 11, 4, 1))
  out = gated_attention(q, k, v, ones, mask=masks.causal(), impl="xla")
  expected = dot_product_attention(q, k, v, mask=masks.causal(), impl="xla")
  assert_close(out, expected, TOL_EXACT_F32, "gate = 1")


def test_registered_variant_is_causal_by_default():
  args = _inputs(2, 1, 9, 2, 2, 8, 8)
  assert_close(registry.get("gated")(*args, impl="reference"), _paper(*args), TOL_EXACT_F32)


def test_bad_gate_shape_names_the_argument():
  q, k, v, gate = _inputs(3, 1, 5, 2, 2, 8, 8)
  with pytest.raises(ValueError, match=r"gate must be \[batch, q_len, heads, 1 or value_dim\]"):
    gated_attention(q, k, v, gate[..., :3])
