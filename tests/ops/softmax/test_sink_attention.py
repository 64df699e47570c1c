"""`sink_attention` against StreamingLLM's formula: a sink logit per head in the denominator and
learned sink tokens visible to every query."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, registry
from attnjax.ops import dot_product_attention, sink_attention
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
  repeat_kv,
  weighted_values,
)


def _inputs(seed, b=2, t=13, h=6, hk=2, d=60, n_sink_tokens=3):
  keys = jax.random.split(jax.random.key(seed), 6)
  q, k, v = (random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))
  sinks = random_normal(keys[3], (h,))
  sink_k = random_normal(keys[4], (n_sink_tokens, hk, d))
  sink_v = random_normal(keys[5], (n_sink_tokens, hk, d))
  return q, k, v, sinks, sink_k, sink_v


def _paper(q, k, v, sinks, sink_k, sink_v):
  """exp terms of tokens (causal), of sink tokens (always) and of the sink logit, normalized."""
  b, t, h, _ = q.shape
  token_terms = jnp.where(causal_allowed(t, t), jnp.exp(logits(q, k)), 0.0)
  sink_terms = jnp.exp(logits(q, jnp.broadcast_to(sink_k, (b, *sink_k.shape))))
  denom = token_terms.sum(-1) + sink_terms.sum(-1) + jnp.exp(sinks)[None, :, None]
  numer = weighted_values(token_terms, v, h) + jnp.einsum(
    "bhqn,nhd->bqhd", sink_terms, repeat_kv(sink_v[None], h)[0]
  )
  return numer / denom.transpose(0, 2, 1)[..., None]


@pytest.mark.parametrize("impl,tol", [("reference", TOL_EXACT_F32), ("xla", TOL_BLOCKED_F32)])
def test_matches_formula_values_and_gradients(impl, tol):
  op = functools.partial(sink_attention, mask=masks.causal(), impl=impl)

  def with_tokens(q, k, v, sinks, sink_k, sink_v):
    return op(q, k, v, sinks=sinks, sink_k=sink_k, sink_v=sink_v)

  assert_matches_reference(with_tokens, _paper, _inputs(0), {}, tol, impl)


def test_sink_logit_alone_matches_formula():
  q, k, v, sinks, _, _ = _inputs(1)
  out = sink_attention(q, k, v, sinks=sinks, mask=masks.causal(), impl="reference")
  t = q.shape[1]
  terms = jnp.where(causal_allowed(t, t), jnp.exp(logits(q, k)), 0.0)
  expected = (
    weighted_values(terms, v, q.shape[2])
    / (terms.sum(-1) + jnp.exp(sinks)[None, :, None]).transpose(0, 2, 1)[..., None]
  )
  assert_close(out, expected, TOL_EXACT_F32, "sink logit")


def test_sink_logit_minus_inf_is_softmax_attention():
  q, k, v, sinks, _, _ = _inputs(2)
  out = sink_attention(q, k, v, sinks=jnp.full_like(sinks, -jnp.inf), mask=masks.causal())
  assert_close(out, dot_product_attention(q, k, v, mask=masks.causal()), TOL_EXACT_F32)


def test_sink_tokens_are_visible_to_fully_masked_rows_and_segments():
  q, k, v, _, sink_k, sink_v = _inputs(3, b=1, t=6)
  segment_ids = jnp.array([[0, 0, 1, 1, 1, 2]])
  nothing = masks.sliding_window(0) & ~masks.causal()  # allows no key at all

  @jax.jit
  def op(q, sink_k):
    return sink_attention(
      q, k, v, sink_k=sink_k, sink_v=sink_v, mask=nothing, segment_ids=segment_ids, impl="xla"
    )

  # Every row is attention over the sink tokens alone.
  sink_probs = jax.nn.softmax(logits(q, sink_k[None]), axis=-1)
  alone = jnp.einsum("bhqn,nhd->bqhd", sink_probs, repeat_kv(sink_v[None], q.shape[2])[0])
  assert_close(op(q, sink_k), alone, TOL_BLOCKED_F32, "sink tokens only")
  grads = jax.grad(lambda q, sk: jnp.sum(op(q, sk) ** 2), argnums=(0, 1))(q, sink_k)
  assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in grads)


def test_registered_variant_is_causal_by_default():
  q, k, v, sinks, sink_k, sink_v = _inputs(4)
  out = registry.get("sinks")(q, k, v, sinks=sinks, sink_k=sink_k, sink_v=sink_v)
  assert_close(out, _paper(q, k, v, sinks, sink_k, sink_v), TOL_BLOCKED_F32)


def test_bad_sink_tokens_name_the_argument():
  q, k, v, _, sink_k, sink_v = _inputs(5)
  with pytest.raises(ValueError, match="sink_k must be"):
    sink_attention(q, k, v, sink_k=sink_k[:, :1], sink_v=sink_v)
  with pytest.raises(ValueError, match="sink_v must be"):
    sink_attention(q, k, v, sink_k=sink_k, sink_v=sink_v[:2])
  with pytest.raises(ValueError, match="together"):
    sink_attention(q, k, v, sink_k=sink_k)
