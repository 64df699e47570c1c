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


def _delta(distance, num_buckets=NUM_BUCKETS, max_distance=None):
  """delta for one integer distance i - j: the paper's clip(i - j + k, 0, 2k - 1) with
  k = num_buckets // 2, or (max_distance) DeBERTa v2's log bucket of i - j, then the same."""
  k = num_buckets // 2
  r = distance
  if max_distance is not None:
    mid = k // 2
    r = max(-(max_distance - 1), min(distance, max_distance - 1))
    if abs(r) > mid:
      steps = math.log(abs(r) / mid) / math.log((max_distance - 1) / mid)
      r = int(np.sign(r)) * (mid + math.ceil(steps * (mid - 1)))
  if r <= -k:
    return 0
  if r >= k:
    return 2 * k - 1
  return r + k


def _inputs(seed, b=2, t=11, h=4, hk=2, d=60):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))
  q_rel = random_normal(keys[3], (NUM_BUCKETS, h, d))
  k_rel = random_normal(keys[4], (NUM_BUCKETS, hk, d))
  return q, k, v, q_rel, k_rel


def _paper(q, k, v, q_rel, k_rel, causal=False, max_distance=None):
  """s_ij = q_i.k_j + q_i.k^r_{delta(i,j)} + k_j.q^r_{delta(j,i)}, softmax_j(s / sqrt(3d))."""
  t, h, d = q.shape[1], q.shape[2], q.shape[3]
  delta = np.array([[_delta(i - j, max_distance=max_distance) for j in range(t)] for i in range(t)])
  k, v, k_rel = repeat_kv(k, h), repeat_kv(v, h), repeat_kv(k_rel[None], h)[0]
  c2c = jnp.einsum("bihd,bjhd->bhij", q, k)
  c2p = jnp.einsum("bihd,ijhd->bhij", q, k_rel[delta])
  p2c = jnp.einsum("bjhd,jihd->bhij", k, q_rel[delta])  # row j, column i: delta(j, i)
  s = (c2c + c2p + p2c) / jnp.sqrt(3.0 * d)
  if causal:
    s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("max_distance", [None, MAX_DISTANCE], ids=["paper", "log"])
def test_buckets_follow_delta(max_distance):
  distance = np.arange(-40, 41)
  got = relative_buckets(distance, NUM_BUCKETS, max_distance)
  assert list(got) == [_delta(int(r), max_distance=max_distance) for r in distance]
  assert got.min() >= 0 and got.max() < NUM_BUCKETS and np.all(np.diff(got) >= 0)


def test_paper_buckets_clip_at_k_and_log_buckets_keep_near_distances_exact():
  k = NUM_BUCKETS // 2
  paper = relative_buckets(np.arange(-9, 10), NUM_BUCKETS)
  assert list(paper) == [0] * 3 + list(range(0, 2 * k)) + [2 * k - 1] * 4
  log = relative_buckets(np.arange(-3, 4), NUM_BUCKETS, MAX_DISTANCE)  # |d| <= k // 2 = 3
  assert list(log) == list(range(k - 3, k + 4))


def test_position_to_content_indexes_the_position_query_by_delta_j_i():
  # With q = 0 and k^r = 0 only k_j . q^r_{delta(j, i)} is left; the transposed index
  # delta(i, j) (the released code's) gives another function.
  _, k, v, q_rel, k_rel = _inputs(3, b=1, t=5)
  t, h, d = 5, q_rel.shape[1], q_rel.shape[2]
  out = disentangled_attention(jnp.zeros((1, t, h, d)), k, v, q_rel, jnp.zeros_like(k_rel))
  k_h, v_h = repeat_kv(k, h), repeat_kv(v, h)

  def attend(bucket_ji):  # bucket_ji[j, i]: the position query read by query i at key j
    s = jnp.einsum("bjhd,jihd->bhij", k_h, q_rel[bucket_ji]) / jnp.sqrt(3.0 * d)
    return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, axis=-1), v_h)

  delta_ji = np.array([[_delta(j - i) for i in range(t)] for j in range(t)])
  assert_close(out, attend(delta_ji), TOL_EXACT_F32, "delta(j, i)")
  assert not np.allclose(out, attend(delta_ji.T), atol=1e-3)


@pytest.mark.parametrize(
  "causal,max_distance",
  [(False, None), (True, None), (False, MAX_DISTANCE)],
  ids=["bidirectional", "causal", "log-buckets"],
)
def test_matches_formula_values_and_gradients(causal, max_distance):
  op = functools.partial(
    disentangled_attention,
    max_distance=max_distance,
    mask=masks.causal() if causal else None,
    impl="reference",
  )
  oracle = functools.partial(_paper, causal=causal, max_distance=max_distance)
  assert_matches_reference(
    op, oracle, _inputs(0), {}, TOL_EXACT_F32, f"causal={causal} max_distance={max_distance}"
  )


def test_segments_and_bad_inputs():
  q, k, v, q_rel, k_rel = _inputs(1, b=1, t=7)
  ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
  out = disentangled_attention(q, k, v, q_rel, k_rel, segment_ids=ids)
  first = _paper(q[:, :3], k[:, :3], v[:, :3], q_rel, k_rel)
  assert_close(out[:, :3], first, TOL_EXACT_F32, "first segment")
  with pytest.raises(ValueError, match="k_rel must be"):
    disentangled_attention(q, k, v, q_rel, k_rel[:, :1])
  with pytest.raises(ValueError, match="log buckets need"):
    disentangled_attention(q, k, v, q_rel, k_rel, max_distance=3)
  with pytest.raises(ValueError, match="no implementation|not available"):
    disentangled_attention(q, k, v, q_rel, k_rel, impl="xla")
