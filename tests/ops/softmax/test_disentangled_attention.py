"""DeBERTa disentangled attention against its formula, term by term, with numpy buckets."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.ops import disentangled_attention
from attnjax.ops.softmax.disentangled import relative_buckets
from tests.helpers import TOL_EXACT_F32, assert_close, assert_matches_reference, random_normal
from tests.ops.softmax.dense_softmax import repeat_kv

NUM_BUCKETS, MAX_DISTANCE = 12, 16


def _bucket(distance, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE):
  """d(i, j) for one integer distance i - j, written out as the docstring states it."""
  half = num_buckets // 2
  exact = max(half // 2, 1)
  m = abs(distance)
  if m < exact:
    b = m
  else:
    steps = math.log(m / exact) / math.log(max(max_distance / exact, 2))
    b = min(exact + math.floor(steps * (half - 1 - exact)), half - 1)
  return int(np.sign(distance)) * b + half


def _inputs(seed, b=2, t=11, h=4, hk=2, d=60):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))
  q_rel = random_normal(keys[3], (NUM_BUCKETS, h, d))
  k_rel = random_normal(keys[4], (NUM_BUCKETS, hk, d))
  return q, k, v, q_rel, k_rel


def _paper(q, k, v, q_rel, k_rel, causal=False):
  """s_ij = (q_i.k_j + q_i.k^r_{d(i,j)} + k_j.q^r_{d(j,i)}) / sqrt(3d), softmax over j."""
  t, h, d = q.shape[1], q.shape[2], q.shape[3]
  d_ij = np.array([[_bucket(i - j) for j in range(t)] for i in range(t)])
  k, v, k_rel = repeat_kv(k, h), repeat_kv(v, h), repeat_kv(k_rel[None], h)[0]
  c2c = jnp.einsum("bihd,bjhd->bhij", q, k)
  c2p = jnp.einsum("bihd,ijhd->bhij", q, k_rel[d_ij])
  p2c = jnp.einsum("bjhd,jihd->bhij", k, q_rel[d_ij])  # row j, column i: d(j, i)
  s = (c2c + c2p + p2c) / jnp.sqrt(3.0 * d)
  if causal:
    s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, axis=-1), v)


def test_buckets_are_exact_near_log_spaced_far_and_clipped():
  distance = np.arange(-40, 41)
  got = np.asarray(relative_buckets(jnp.asarray(distance), NUM_BUCKETS, MAX_DISTANCE))
  assert list(got) == [_bucket(int(r)) for r in distance]
  assert got.min() >= 0 and got.max() < NUM_BUCKETS and np.all(np.diff(got) >= 0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_matches_formula_values_and_gradients(causal):
  op = functools.partial(
    disentangled_attention,
    max_distance=MAX_DISTANCE,
    mask=masks.causal() if causal else None,
    impl="reference",
  )
  oracle = functools.partial(_paper, causal=causal)
  assert_matches_reference(
    op, oracle, _inputs(0), {}, TOL_EXACT_F32, "causal" if causal else "bidirectional"
  )


def test_segments_and_bad_inputs():
  q, k, v, q_rel, k_rel = _inputs(1, b=1, t=7)
  ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
  out = disentangled_attention(q, k, v, q_rel, k_rel, max_distance=MAX_DISTANCE, segment_ids=ids)
  first = _paper(q[:, :3], k[:, :3], v[:, :3], q_rel, k_rel)
  assert_close(out[:, :3], first, TOL_EXACT_F32, "first segment")
  with pytest.raises(ValueError, match="k_rel must be"):
    disentangled_attention(q, k, v, q_rel, k_rel[:, :1])
  with pytest.raises(ValueError, match="no implementation|not available"):
    disentangled_attention(q, k, v, q_rel, k_rel, impl="xla")
