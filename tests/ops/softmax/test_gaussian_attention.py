"""`gaussian_attention` against the paper's density block, with each position's mean and
variance computed directly (two-pass) from the slice of positions it may see."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import registry
from attnjax.ops import gaussian_attention
from tests.helpers import (
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)

EPS = 1e-2


def _inputs(seed, b=2, t=17, h=3, d=12):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = random_normal(keys[0], (b, t, h, d))
  mean_offset = 0.3 * random_normal(keys[1], (h,))
  var_scale = jnp.exp(0.5 * random_normal(keys[2], (h,)))
  return x, mean_offset, var_scale


def _paper(x, mean_offset, var_scale, *, causal=True, bounds=None):
  """z_t = (x_t - (mu_t + delta)) / sqrt(var_t + eps), out_t = x_t exp(-z_t^2 / (2 xi)),
  slice by slice."""
  t = x.shape[1]
  bounds = bounds or [(0, t)]
  rows = []
  for lo, hi in bounds:
    for i in range(lo, hi):
      seen = x[:, lo : i + 1] if causal else x[:, lo:hi]
      mu, var = seen.mean(axis=1), seen.var(axis=1)  # [b, h, d]
      z = (x[:, i] - (mu + mean_offset[:, None])) / jnp.sqrt(var + EPS)
      rows.append(x[:, i] * jnp.exp(-(z**2) / (2 * var_scale[:, None])))
  return jnp.stack(rows, axis=1)


@pytest.mark.parametrize("impl,tol", [("reference", TOL_EXACT_F32), ("xla", TOL_BLOCKED_F32)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_formula_values_and_gradients(impl, tol, causal):
  op = functools.partial(gaussian_attention, causal=causal, eps=EPS, impl=impl)
  oracle = functools.partial(_paper, causal=causal)
  assert_matches_reference(op, oracle, _inputs(0), {}, tol, f"{impl} causal={causal}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("causal", [True, False])
def test_segments_keep_their_own_statistics(impl, causal):
  x, mean_offset, var_scale = _inputs(1, b=1, t=10)
  segment_ids = jnp.array([[4, 4, 4, 0, 0, 4, 4, 4, 4, 4]])  # id 4 twice: two separate runs
  op = jax.jit(functools.partial(gaussian_attention, causal=causal, eps=EPS, impl=impl))
  out = op(x, mean_offset, var_scale, segment_ids=segment_ids)
  expected = _paper(x, mean_offset, var_scale, causal=causal, bounds=[(0, 3), (3, 5), (5, 10)])
  assert_close(out, expected, TOL_BLOCKED_F32, f"{impl} causal={causal}")


def test_first_causal_position_has_zero_variance_and_scales_eps_by_xi():
  # Position 0 sees only itself: mu = x_0, var = 0, so its weight is exp(-delta^2 / (2 xi eps)).
  x, mean_offset, var_scale = _inputs(6, t=4)
  out = gaussian_attention(x, mean_offset, var_scale, eps=EPS, impl="reference")
  weight = jnp.exp(-(mean_offset**2) / (2 * var_scale * EPS))[None, :, None]
  assert_close(out[:, 0], x[:, 0] * weight, TOL_EXACT_F32, "position 0")


def test_causal_output_ignores_the_future():
  x, mean_offset, var_scale = _inputs(2, t=12)
  future = x.at[:, 7:].set(random_normal(jax.random.key(5), x[:, 7:].shape))
  op = registry.get("gaussian")
  assert_close(
    op(future, mean_offset, var_scale)[:, :7], op(x, mean_offset, var_scale)[:, :7], TOL_EXACT_F32
  )


def test_default_eps_gives_finite_values_and_gradients_at_a_single_position():
  x, mean_offset, var_scale = _inputs(3, t=6)
  for impl in ("reference", "xla"):
    op = functools.partial(gaussian_attention, mean_offset=mean_offset, var_scale=var_scale)
    grads = jax.grad(lambda x, op=op, impl=impl: jnp.sum(op(x, impl=impl)))(x)
    assert bool(jnp.all(jnp.isfinite(grads))), impl


def test_bad_arguments_name_them():
  x, mean_offset, var_scale = _inputs(4, t=5)
  with pytest.raises(ValueError, match="x must be"):
    gaussian_attention(x[0], mean_offset, var_scale)
  with pytest.raises(ValueError, match=r"mean_offset must be \[heads\]"):
    gaussian_attention(x, mean_offset[:2], var_scale)
  with pytest.raises(ValueError, match=r"var_scale must be \[heads\]"):
    gaussian_attention(x, mean_offset, var_scale[None])
  with pytest.raises(ValueError, match="segment_ids must be"):
    gaussian_attention(x, mean_offset, var_scale, segment_ids=jnp.zeros((2, 4), jnp.int32))
