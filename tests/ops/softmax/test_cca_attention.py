"""`cca_attention` against the paper's formula written out densely: core tokens pooled group by
group, then one softmax over the visible core tokens and the local window's tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, registry
from attnjax.ops import cca_attention
from attnjax.ops.softmax.cca import LocalKeys
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)
from tests.ops.softmax.dense_softmax import logits, repeat_kv, softmax_attention


def _inputs(seed, b=2, t=14, h=6, hk=2, d=60):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(random_normal(keys[i], (b, t, n, d)) for i, n in enumerate((h, hk, hk)))


def _visible(t, group_size, window):
  """For query i = 1..t (1-based, as the paper): j(i) visible cores and the first local token
  k(i), read as the token after core j(i)."""
  g, s = group_size, window
  rows = []
  for i in range(1, t + 1):
    j = max(0, (i - s) // g)
    k = max(1, i - s - ((i - s) % g)) + (1 if j > 0 else 0)
    rows.append((j, k))
  return rows


def _paper(q, k, v, *, group_size, window):
  t, h, d = q.shape[1], q.shape[2], q.shape[3]
  k, v = repeat_kv(k, h), repeat_kv(v, h)
  g = group_size
  cores_k, cores_v = [], []
  for m in range(1, t // g + 1):  # I_m = {(m-1)g+1, ..., mg}: complete groups only
    group = slice((m - 1) * g, m * g)
    w = jax.nn.softmax(jnp.einsum("bhd,bjhd->bhj", q[:, m * g - 1], k[:, group]) / d**0.5, -1)
    cores_k.append(jnp.einsum("bhj,bjhd->bhd", w, k[:, group]))
    cores_v.append(jnp.einsum("bhj,bjhd->bhd", w, v[:, group]))
  core_k, core_v = jnp.stack(cores_k, 1), jnp.stack(cores_v, 1)  # [b, m, h, d]
  rows = _visible(t, group_size, window)
  core_seen = jnp.array([[m < j for m in range(core_k.shape[1])] for j, _ in rows])
  token_seen = jnp.array(
    [[first <= u <= i for u in range(1, t + 1)] for i, (_, first) in enumerate(rows, start=1)]
  )
  s = jnp.concatenate(
    [
      jnp.where(core_seen, jnp.einsum("bqhd,bmhd->bhqm", q, core_k) / d**0.5, -jnp.inf),
      jnp.where(token_seen, logits(q, k), -jnp.inf),
    ],
    axis=-1,
  )
  a = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhqn,bnhd->bqhd", a, jnp.concatenate([core_v, v], axis=1))


@pytest.mark.parametrize(
  "impl,tol,group_size,window",
  [
    ("reference", TOL_EXACT_F32, 4, 5),
    ("xla", TOL_BLOCKED_F32, 4, 5),
    ("xla", TOL_BLOCKED_F32, 3, 1),
  ],
)
def test_matches_formula_values_and_gradients(impl, tol, group_size, window):
  op = functools.partial(cca_attention, group_size=group_size, window=window, impl=impl)
  oracle = functools.partial(_paper, group_size=group_size, window=window)
  assert_matches_reference(op, oracle, _inputs(0), {}, tol, f"{impl} g={group_size} w={window}")


@pytest.mark.parametrize("group_size,window", [(4, 5), (3, 1), (4, 8)])
def test_cores_and_local_keys_cover_the_past_once(group_size, window):
  t = 23
  local = masks.to_dense(LocalKeys(group_size, window), t, t)
  for i, (j, first) in enumerate(_visible(t, group_size, window)):
    seen = np.zeros(t, int)
    seen[: j * group_size] += 1  # the tokens of cores 1..j
    seen += local[i]
    assert list(seen) == [1] * (i + 1) + [0] * (t - i - 1), i
    assert local[i].sum() >= min(window, i + 1) and np.flatnonzero(local[i])[0] == first - 1


def test_is_causal():
  q, k, v = _inputs(1, t=16)
  op = jax.jit(functools.partial(cca_attention, group_size=4, window=3))
  changed = [x.at[:, 9:].set(random_normal(jax.random.key(7), x[:, 9:].shape)) for x in (q, k, v)]
  assert_close(op(*changed)[:, :9], op(q, k, v)[:, :9], TOL_EXACT_F32, "past rows")


def test_window_over_the_whole_sequence_without_cores_is_causal_softmax():
  q, k, v = _inputs(2, t=9)
  out = registry.get("cca")(q, k, v, group_size=16, window=9)  # no complete group
  assert_close(out, softmax_attention(q, k, v, causal=True), TOL_BLOCKED_F32)


def test_bad_arguments_name_them():
  q, k, v = _inputs(3, t=5)
  with pytest.raises(ValueError, match="group_size must be a positive int"):
    cca_attention(q, k, v, group_size=0)
  with pytest.raises(ValueError, match="window must be a positive int"):
    cca_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="segment_ids must be None"):
    cca_attention(q, k, v, segment_ids=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="same length"):
    cca_attention(q[:, :3], k, v)
