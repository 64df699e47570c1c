"""`softplus_attention` (LSSA / LSSAR) against the paper's formula written out densely."""

import functools
import math

import jax
import jax.numpy as jnp
import pytest

from attnjax.ops import softplus_attention
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import causal_allowed, logits, weighted_values


def _inputs(seed, b=2, t=19, h=6, hk=2, d=60):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))


def _paper(q, k, v, *, train_len=None, power=1.0):
  """a_ij ∝ softplus(log(i+1)/log(N_train) * q.k/sqrt(d))^p over j <= i."""
  t = q.shape[1]
  lam = 1.0 if train_len is None else jnp.log(jnp.arange(1, t + 1)) / math.log(train_len)
  s = logits(q, k) * jnp.reshape(lam, (1, 1, -1, 1))
  terms = jnp.where(causal_allowed(t, t), jnp.log1p(jnp.exp(s)) ** power, 0.0)
  return weighted_values(terms / terms.sum(-1, keepdims=True), v, q.shape[2])


@pytest.mark.parametrize("impl,tol", [("reference", TOL_EXACT_F32), ("xla", TOL_BLOCKED_F32)])
@pytest.mark.parametrize("train_len,power", [(None, None), (8, 3.0)], ids=["plain", "lssar"])
def test_matches_formula_values_and_gradients(impl, tol, train_len, power):
  op = functools.partial(
    softplus_attention, train_len=train_len, reweight_power=power, impl=impl, block_kv=8
  )
  oracle = functools.partial(_paper, train_len=train_len, power=power or 1.0)
  assert_matches_reference(
    op, oracle, _inputs(0), {}, tol, f"{impl} train_len={train_len} p={power}"
  )


def test_segments_restart_rows_and_a_single_key_gets_all_weight():
  q, k, v = _inputs(1, b=1, t=9)
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
  op = jax.jit(functools.partial(softplus_attention, train_len=4, impl="xla", block_kv=4))
  out = op(q, k, v, segment_ids=segment_ids)
  for lo, hi in ((0, 3), (3, 5), (5, 9)):
    expected = _paper(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], train_len=4)
    assert_close(out[:, lo:hi], expected, TOL_BLOCKED_F32, f"segment {lo}:{hi}")
  one_key = softplus_attention(q[:, :1], k[:, :1], v[:, :1], train_len=4, impl="reference")
  assert_close(one_key, jnp.repeat(v[:, :1], 3, axis=2), TOL_EXACT_F32, "one key")


def test_bad_arguments_name_them():
  q, k, v = _inputs(2, t=5)
  with pytest.raises(ValueError, match="train_len must be >= 2"):
    softplus_attention(q, k, v, train_len=1)
  with pytest.raises(ValueError, match="reweight_power must be positive"):
    softplus_attention(q, k, v, reweight_power=0.0)
  with pytest.raises(ValueError, match="segment_ids must be"):
    softplus_attention(q, k, v, segment_ids=jnp.zeros((2, 4), jnp.int32))
