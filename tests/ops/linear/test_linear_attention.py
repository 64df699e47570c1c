"""`linear_attention`: every fast implementation against the float32 recurrence.

Values, final states and gradients (q, k, v, log_decay, initial_state) for every decay kind,
feature map, causal and bidirectional mode, GQA, odd lengths, float32 and bfloat16; the
reference itself against a dense quadratic formula; decoding and state passing.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import registry
from attnjax.ops import linear_attention, linear_attention_step
from attnjax.ops.linear import feature_maps
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  tolerance,
)

FAST_IMPLS = ["xla", "pallas_interpret"]
DECAY_KINDS = ["none", "head", "scalar", "vector"]


def normal(rng, shape, dtype=jnp.float32):
  """Fresh standard normal values (numpy: no per-shape compilation)."""
  return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def make_log_decay(kind, rng, batch, seq, heads, key_dim, strength=1.0):
  """Fresh random log decays (< 0) of the given kind, or None."""
  if kind == "none":
    return None
  shape = {
    "head": (heads,),
    "scalar": (batch, seq, heads),
    "vector": (batch, seq, heads, key_dim),
  }[kind]
  return jnp.asarray(-strength * np.logaddexp(0.0, rng.standard_normal(shape) - 1.0), jnp.float32)


def make_inputs(
  seed,
  *,
  batch=2,
  seq=37,
  heads=4,
  kv_heads=2,
  head_dim=12,
  value_dim=10,
  decay="scalar",
  feature_map=None,
  normalize=False,
  dtype=jnp.float32,
  with_state=True,
):
  """(q, k, v, log_decay, initial_state) drawn fresh from `seed`."""
  rng = np.random.default_rng(seed)
  q = normal(rng, (batch, seq, heads, head_dim), dtype)
  k = normal(rng, (batch, seq, kv_heads, head_dim), dtype)
  v = normal(rng, (batch, seq, kv_heads, value_dim), dtype)
  key_dim = feature_maps.feature_dim(feature_map, head_dim)
  log_decay = make_log_decay(decay, rng, batch, seq, heads, key_dim)
  state = None
  if with_state:
    state_dim = value_dim + 1 if normalize else value_dim
    state = jnp.asarray(rng.uniform(0.0, 1.0, (batch, heads, key_dim, state_dim)), jnp.float32)
  return q, k, v, log_decay, state


def check_matches_reference(impl, inputs, tol, **options):
  """`impl` equals the reference on outputs, final states and every input's gradient."""
  q, k, v, log_decay, state = inputs
  kwargs = dict(log_decay=log_decay, initial_state=state, return_final_state=True, **options)
  out, final = linear_attention(q, k, v, impl=impl, **kwargs)
  assert out.dtype == q.dtype and final.dtype == jnp.float32
  assert_matches_reference(
    functools.partial(linear_attention, impl=impl),
    functools.partial(linear_attention, impl="reference"),
    (q, k, v),
    kwargs,
    tol,
    f"{impl} {options}",
  )


# Feature maps are applied by the op before dispatch, so the kernel sees two of them.
FEATURE_MAP_CASES = [("identity", False), ("elu+1", True), ("relu", False), ("softmax", True),
                     ("taylor", True)]  # fmt: skip
IMPL_FEATURE_MAP_CASES = [("xla", "vector", *case) for case in FEATURE_MAP_CASES] + [
  ("pallas_interpret", "vector", "elu+1", True),
  ("pallas_interpret", "head", "taylor", True),
]


@pytest.mark.parametrize("strength", [1.0, 8.0], ids=["decay", "strong_decay"])
def test_xla_channel_decay_over_sub_chunks_matches_reference(strength):
  # Chunks of 64 tokens: four 16-token sub-chunks, the last chunk padded (100 = 64 + 36).
  q, k, v, _, state = make_inputs(6, seq=100, decay="vector")
  rng = np.random.default_rng(7)
  log_decay = make_log_decay("vector", rng, 2, 100, 4, 12, strength=strength)
  inputs = (q, k, v, log_decay, state)
  check_matches_reference("xla", inputs, TOL_BLOCKED_F32, causal=True, chunk_size=64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("decay", DECAY_KINDS)
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_matches_reference_for_every_decay_kind(impl, decay, causal):
  inputs = make_inputs(0, decay=decay)
  check_matches_reference(impl, inputs, TOL_BLOCKED_F32, causal=causal, chunk_size=16)


def test_auto_runs_where_the_kernel_is_unsupported():
  q, k, v, log_decay, _ = make_inputs(0, seq=9, decay="vector")
  if jax.default_backend() != "tpu":
    with pytest.raises(registry.Unsupported, match="impl='pallas'"):
      linear_attention(q, k, v, log_decay=log_decay, impl="pallas")
  auto = linear_attention(q, k, v, log_decay=log_decay, impl="auto")
  assert_close(auto, linear_attention(q, k, v, log_decay=log_decay, impl="reference"), 1e-4, "auto")


@pytest.mark.parametrize(("impl", "decay", "feature_map", "normalize"), IMPL_FEATURE_MAP_CASES)
def test_matches_reference_for_every_feature_map(impl, decay, feature_map, normalize):
  inputs = make_inputs(
    1, head_dim=4, seq=21, decay=decay, feature_map=feature_map, normalize=normalize
  )
  options = dict(feature_map=feature_map, normalize=normalize, chunk_size=8)
  check_matches_reference(impl, inputs, TOL_BLOCKED_F32, **options)


@pytest.mark.parametrize(
  ("impl", "decay"),
  [("xla", "vector"), ("pallas_interpret", "scalar"), ("pallas_interpret", "vector")],
)
def test_bfloat16_inputs(impl, decay):
  inputs = make_inputs(2, decay=decay, dtype=jnp.bfloat16)
  check_matches_reference(impl, inputs, tolerance(jnp.bfloat16), chunk_size=16)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@hypothesis.settings(max_examples=3)
@hypothesis.given(
  seq=st.integers(1, 70),
  kv_heads=st.sampled_from([1, 2]),
  groups=st.sampled_from([1, 3]),
  head_dim=st.sampled_from([60, 64, 128]),
  chunk_size=st.sampled_from([8, 16, 64]),
  decay=st.sampled_from(DECAY_KINDS),
  seed=st.integers(0, 2**16),
)
def test_matches_reference_over_shapes(
  impl, seq, kv_heads, groups, head_dim, chunk_size, decay, seed
):
  inputs = make_inputs(
    seed,
    batch=1,
    seq=seq,
    heads=kv_heads * groups,
    kv_heads=kv_heads,
    head_dim=head_dim,
    value_dim=head_dim,
    decay=decay,
  )
  check_matches_reference(impl, inputs, TOL_BLOCKED_F32, chunk_size=chunk_size)


def dense_linear_attention(q, k, v, log_decay, *, scale, causal, normalize, phi):
  """Quadratic form `o_i = sum_j phi(q_i) diag(prod_{j<r<=i} a_r) phi(k_j) v_j`, GQA by repeat."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  fq, fk = phi(q * scale), phi(k)
  seq = q.shape[1]
  cum = jnp.cumsum(log_decay, axis=1)  # [b, t, h, f]
  end = cum[:, -1:] if not causal else cum
  # weight[b, i, j, h, f] = exp(cum_i - cum_j) for j <= i (causal) or exp(cum_T - cum_j).
  diff = end[:, :, None] - cum[:, None, :]
  allowed = jnp.tril(jnp.ones((seq, seq), bool)) if causal else jnp.ones((1, seq), bool)
  weight = jnp.where(allowed[None, :, :, None, None], jnp.exp(jnp.minimum(diff, 0.0)), 0.0)
  if not causal:
    weight = jnp.broadcast_to(weight, (q.shape[0], seq, seq) + weight.shape[3:])
  scores = jnp.einsum("bihf,bjhf,bijhf->bhij", fq, fk, weight)
  out = jnp.einsum("bhij,bjhv->bihv", scores, v)
  if normalize:
    out = out / (jnp.einsum("bhij->bih", scores)[..., None] + 1e-6)
  return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("feature_map", "normalize"), [(None, False), ("elu+1", True)])
def test_reference_matches_dense_quadratic_form(feature_map, normalize, causal):
  q, k, v, log_decay, _ = make_inputs(
    3, seq=19, decay="vector", feature_map=feature_map, with_state=False
  )
  out = linear_attention(
    q,
    k,
    v,
    log_decay=log_decay,
    feature_map=feature_map,
    normalize=normalize,
    causal=causal,
    impl="reference",
  )
  phi = feature_maps.resolve(feature_map)
  expected = dense_linear_attention(
    q, k, v, log_decay, scale=12**-0.5, causal=causal, normalize=normalize, phi=phi
  )
  assert_close(out, expected, TOL_EXACT_F32, "out")


@pytest.mark.parametrize(
  ("decay", "normalize"), [("none", False), ("head", True), ("scalar", False), ("vector", True)]
)
def test_step_by_step_decoding_matches_chunked(decay, normalize):
  fmap = "elu+1" if normalize else None
  q, k, v, log_decay, state = make_inputs(
    4, seq=13, decay=decay, feature_map=fmap, normalize=normalize
  )
  options = dict(feature_map=fmap, normalize=normalize)
  out, final = linear_attention(
    q, k, v, log_decay=log_decay, initial_state=state, return_final_state=True, impl="xla",
    chunk_size=4, **options,
  )  # fmt: skip
  step = jax.jit(functools.partial(linear_attention_step, **options))
  outs = []
  for t in range(q.shape[1]):
    decay_t = log_decay if log_decay is None or log_decay.ndim == 1 else log_decay[:, t]
    out_t, state = step(q[:, t], k[:, t], v[:, t], state, log_decay=decay_t)
    outs.append(out_t)
  assert_close(jnp.stack(outs, axis=1), out, TOL_BLOCKED_F32, "decoded outputs")
  assert_close(state, final, TOL_BLOCKED_F32, "decoded state")


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_state_passing_splits_the_sequence(impl):
  q, k, v, log_decay, state = make_inputs(5, seq=40, decay="vector")
  run = functools.partial(linear_attention, return_final_state=True, impl=impl, chunk_size=16)
  out, final = run(q, k, v, log_decay=log_decay, initial_state=state)
  half = 20
  out_a, mid = run(
    q[:, :half], k[:, :half], v[:, :half], log_decay=log_decay[:, :half], initial_state=state
  )
  out_b, final_b = run(
    q[:, half:], k[:, half:], v[:, half:], log_decay=log_decay[:, half:], initial_state=mid
  )
  assert_close(jnp.concatenate([out_a, out_b], axis=1), out, TOL_BLOCKED_F32, "out")
  assert_close(final_b, final, TOL_BLOCKED_F32, "final_state")


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_long_sequence_with_strong_decay_stays_finite_and_exact(decay):
  seq = 65_536
  q, k, v, _, _ = make_inputs(6, batch=1, seq=seq, heads=1, kv_heads=1, head_dim=4,
                                   value_dim=4, with_state=False)  # fmt: skip
  # Per-token decays down to exp(-8): a naive exp(-cumsum) would overflow after ~11 tokens.
  log_decay = make_log_decay(decay, np.random.default_rng(6), 1, seq, 1, 4, strength=8.0)
  run = functools.partial(linear_attention, q, k, v, log_decay=log_decay, return_final_state=True)
  out, final = jax.jit(functools.partial(run, impl="xla", chunk_size=64))()
  ref_out, ref_final = jax.jit(functools.partial(run, impl="reference"))()
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(final))
  positions = np.random.default_rng(0).choice(seq, 256, replace=False)
  assert_close(out[:, positions], ref_out[:, positions], TOL_BLOCKED_F32, "sampled outputs")
  assert_close(final, ref_final, TOL_BLOCKED_F32, "final_state")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_taylor_features_expand_exp_of_the_scaled_score(causal):
  # BASED: weights 1 + s + s^2 / 2 with s = scale * q.k, normalized over the visible keys.
  q, k, v, _, _ = make_inputs(9, seq=17, head_dim=5, with_state=False)
  scale = 0.37
  out = linear_attention(
    q, k, v, feature_map="taylor", normalize=True, scale=scale, causal=causal, impl="reference"
  )
  k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  s = scale * jnp.einsum("bihd,bjhd->bhij", q, k_rep)
  weights = 1 + s + s**2 / 2
  if causal:
    weights = jnp.where(jnp.tril(jnp.ones((17, 17), bool)), weights, 0.0)
  expected = jnp.einsum("bhij,bjhv->bihv", weights, v_rep)
  expected = expected / (weights.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
  assert_close(out, expected, TOL_EXACT_F32, "taylor")


def test_scale_multiplies_q_before_the_feature_map():
  q, k, v, _, _ = make_inputs(10, seq=9, with_state=False)
  for feature_map in ("elu+1", "silu", "relu"):
    out = linear_attention(q, k, v, feature_map=feature_map, scale=0.5, impl="reference")
    phi = feature_maps.resolve(feature_map)
    unscaled = linear_attention(phi(0.5 * q), phi(k), v, scale=1.0, impl="reference")
    assert_close(out, unscaled, TOL_EXACT_F32, feature_map)
  # Normalized: the scale no longer cancels between numerator and denominator.
  options = dict(feature_map="elu+1", normalize=True, impl="reference")
  assert not np.allclose(
    linear_attention(q, k, v, scale=0.5, **options), linear_attention(q, k, v, scale=1.0, **options)
  )


def test_feature_map_dims():
  x = normal(np.random.default_rng(7), (3, 5))
  maps = [("identity", 5), ("elu+1", 5), ("relu", 5), ("softmax", 5), ("silu", 5), ("taylor", 31)]
  for name, dim in maps:
    assert feature_maps.resolve(name)(x).shape == (3, dim)
    assert feature_maps.feature_dim(name, 5) == dim
  taylor = feature_maps.resolve("taylor")
  a, b = x[0], x[1]
  assert_close(taylor(a) @ taylor(b), 1 + a @ b + (a @ b) ** 2 / 2, TOL_EXACT_F32, "taylor")


def test_bad_inputs_raise_value_errors_naming_the_argument():
  q, k, v, _, _ = make_inputs(8, seq=6, with_state=False)
  with pytest.raises(ValueError, match="log_decay must be"):
    linear_attention(q, k, v, log_decay=jnp.zeros((3,)))
  with pytest.raises(ValueError, match=r"initial_state must be .*\(2, 4, 12, 10\)"):
    linear_attention(q, k, v, initial_state=jnp.zeros((2, 2, 12, 10)))
  with pytest.raises(ValueError, match="feature_map must be"):
    linear_attention(q, k, v, feature_map="cosine")
  with pytest.raises(ValueError, match="chunk_size"):
    linear_attention(q, k, v, chunk_size=0)
  with pytest.raises(ValueError, match="same length"):
    linear_attention(q, k[:, :3], v[:, :3])
  with pytest.raises(ValueError, match="q_t must be"):
    linear_attention_step(q, k[:, 0], v[:, 0], jnp.zeros((2, 4, 12, 10)))
