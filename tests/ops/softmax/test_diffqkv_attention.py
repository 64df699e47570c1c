"""`diffqkv_attention` (Sigma) against a dense per-head formula with separate K and V groups."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, registry
from attnjax.ops import diffqkv_attention, dot_product_attention
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import causal_allowed


def _inputs(seed, b=2, t=13, q_heads=8, k_heads=2, v_heads=4, key_dim=60, value_dim=12):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = random_normal(keys[0], (b, t, q_heads, key_dim))
  k = random_normal(keys[1], (b, t, k_heads, key_dim))
  v = random_normal(keys[2], (b, t, v_heads, value_dim))
  return q, k, v


def _paper(q, k, v):
  """Head i: softmax(q_i k_{i // g_k}^T / sqrt(d) + causal) v_{i // g_v}, one head at a time."""
  heads, t = q.shape[2], q.shape[1]
  outs = []
  for i in range(heads):
    k_i = k[:, :, i // (heads // k.shape[2])]
    v_i = v[:, :, i // (heads // v.shape[2])]
    s = jnp.einsum("bqd,bkd->bqk", q[:, :, i], k_i) / jnp.sqrt(q.shape[3])
    s = jnp.where(causal_allowed(t, t), s, -jnp.inf)
    outs.append(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v_i))
  return jnp.stack(outs, axis=2)


@pytest.mark.parametrize("impl,tol", [("reference", TOL_EXACT_F32), ("xla", TOL_BLOCKED_F32)])
def test_matches_formula_values_and_gradients(impl, tol):
  op = functools.partial(diffqkv_attention, mask=masks.causal(), impl=impl)
  assert_matches_reference(op, _paper, _inputs(0), {}, tol, impl)


def test_equal_k_and_v_head_counts_is_grouped_query_attention():
  q, k, v = _inputs(1, k_heads=2, v_heads=2, value_dim=60)
  out = registry.get("diffqkv")(q, k, v, impl="xla")
  expected = dot_product_attention(q, k, v, mask=masks.causal(), impl="xla")
  assert_close(out, expected, TOL_EXACT_F32)


def test_head_counts_must_nest():
  q, k, v = _inputs(2, k_heads=3, v_heads=4)
  with pytest.raises(ValueError, match=r"k_heads \| v_heads \| q_heads: got k_heads=3"):
    diffqkv_attention(q, k, v)
  q, k, v = _inputs(2)
  with pytest.raises(ValueError, match="k must be"):
    diffqkv_attention(q, k[..., :10], v)
