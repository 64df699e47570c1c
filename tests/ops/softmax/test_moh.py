"""MoH (mixture-of-head attention): routing and head-weighted attention against the paper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.ops import dot_product_attention, moh_attention, moh_route
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import softmax_attention


def _inputs(seed, b=2, t=13, h=6, hk=2, d=60):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))
  weights = jax.random.uniform(keys[3], (b, t, h))
  # Heads 1 and 4 are never routed in the first 8 queries: whole (block, head) tiles skip.
  unrouted = (jnp.arange(t)[:, None] < 8) & jnp.isin(jnp.arange(h), jnp.array([1, 4]))
  routed = jax.random.bernoulli(keys[4], 0.6, (b, t, h)) & ~unrouted
  return q, k, v, weights, routed


def _paper(q, k, v, head_weights):
  """sum over heads happens in the output projection; per head: g_ti * H_i(t)."""
  return head_weights[..., None] * softmax_attention(q, k, v, causal=True)


@pytest.mark.parametrize(
  "impl,tol,block_q",
  [("reference", TOL_EXACT_F32, 64), ("xla", TOL_BLOCKED_F32, 4)],
)
def test_matches_formula_values_and_gradients(impl, tol, block_q):
  q, k, v, weights, routed = _inputs(0)
  op = functools.partial(moh_attention, mask=masks.causal(), impl=impl, block_q=block_q)

  # Unselected heads get weight exactly 0 through the top-k mask, as in `moh_route`: the xla
  # path does not compute them, so a weight's gradient there is 0 (on both sides here).
  def routed_op(q, k, v, weights):
    return op(q, k, v, weights * routed)

  def routed_paper(q, k, v, weights):
    return _paper(q, k, v, weights * routed)

  assert_matches_reference(
    routed_op, routed_paper, (q, k, v, weights), {}, tol, f"{impl} block_q={block_q}"
  )


def test_all_heads_with_uniform_weight_is_multi_head_attention():
  q, k, v, _, _ = _inputs(1)
  ones = jnp.ones(q.shape[:3])
  op = jax.jit(functools.partial(moh_attention, mask=masks.causal(), impl="xla", block_q=8))
  expected = dot_product_attention(q, k, v, mask=masks.causal(), impl="reference")
  assert_close(op(q, k, v, ones), expected, TOL_BLOCKED_F32)


def test_decoding_one_query_skips_unselected_heads():
  q, k, v, _, _ = _inputs(2)
  weights = jnp.zeros((2, 1, 6)).at[:, :, 2].set(0.7)
  out = moh_attention(q[:, -1:], k, v, weights, mask=masks.causal(), q_offset=12, impl="xla")
  expected = _paper(q, k, v, jnp.zeros((2, 13, 6)).at[:, :, 2].set(0.7))[:, -1:]
  assert_close(out, expected, TOL_BLOCKED_F32)


def _route_by_hand(shared_logits, routed_logits, balance_logits, top_k):
  shared_logits, routed_logits, balance_logits = (
    np.asarray(x, np.float64) for x in (shared_logits, routed_logits, balance_logits)
  )

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  alpha = softmax(balance_logits)
  probs = softmax(routed_logits)
  kth = np.sort(probs, axis=-1)[..., -top_k][..., None]
  chosen = probs >= kth
  weights = np.concatenate(
    [alpha[..., :1] * softmax(shared_logits), alpha[..., 1:] * probs * chosen], axis=-1
  )
  routed = probs.shape[-1]
  f = chosen.reshape(-1, routed).mean(0)  # fraction of tokens selecting each routed head
  p = probs.reshape(-1, routed).mean(0)  # its mean routing probability
  return weights, np.sum(f * p)


def test_route_matches_the_two_stage_formula_and_balance_loss():
  keys = jax.random.split(jax.random.key(3), 3)
  shared = random_normal(keys[0], (2, 7, 2))
  routed = random_normal(keys[1], (2, 7, 6))
  balance = random_normal(keys[2], (2, 7, 2))
  weights, loss = moh_route(shared, routed, balance, top_k=2)
  expected_weights, expected_loss = _route_by_hand(shared, routed, balance, 2)
  assert_close(weights, expected_weights, TOL_EXACT_F32, "weights")
  assert_close(loss, expected_loss, TOL_EXACT_F32, "loss")
  assert np.all((np.asarray(weights[..., 2:]) > 0).sum(-1) == 2)  # top-2 routed heads per token


def test_balanced_routing_loss_is_top_k_over_routed_and_reaches_the_router():
  # Every routed head chosen by exactly one token of four, with uniform probabilities:
  # f_i = P_i = 1/4, so L_b = 4 * 1/16 = top_k / num_routed.
  routed = jnp.full((1, 4, 4), 0.0)
  shared, balance = jnp.zeros((1, 4, 1)), jnp.zeros((1, 4, 2))
  _, loss = moh_route(shared, routed, balance, top_k=1)
  assert_close(loss, 0.25, TOL_EXACT_F32)
  collapsed = jnp.zeros((1, 4, 4)).at[..., 0].set(5.0)  # every token routes to head 0
  assert float(moh_route(shared, collapsed, balance, top_k=1)[1]) > 0.9
  logits = random_normal(jax.random.key(4), (1, 4, 4))
  grad = jax.grad(lambda r: moh_route(shared, r, balance, top_k=1)[1])(logits)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_bad_inputs_name_the_argument():
  q, k, v, weights, _ = _inputs(5)
  with pytest.raises(ValueError, match=r"head_weights must be \[batch, q_len, heads\]"):
    moh_attention(q, k, v, weights[..., :3])
  with pytest.raises(ValueError, match=r"top_k must be in \[1, num_routed=4\]"):
    moh_route(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 2)), top_k=5)
