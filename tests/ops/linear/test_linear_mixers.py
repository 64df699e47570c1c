"""`attnjax.nn.linear.LinearAttention`: the mixer of every linear-family variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import registry
from attnjax.nn.linear import DESIGNS, LinearAttention
from attnjax.nn.norm import rms_normalize
from attnjax.ops import linear_attention
from tests.helpers import TOL_EXACT_F32, assert_close


def embeddings(seed, batch=2, seq=11, embed=24):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, seq, embed)), jnp.float32)


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_mixer_shape_and_finite_gradients(name):
  mixer = registry.mixer_class(name)(
    24, num_heads=4, num_kv_heads=2, variant=name, rngs=nnx.Rngs(0), impl="xla"
  )
  x = embeddings(0)

  @jax.jit
  def output_and_grads(graphdef, params, x):
    def loss(params, x):
      out = nnx.merge(graphdef, params)(x)
      return jnp.mean(out**2), out

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  graphdef, params = nnx.split(mixer)
  (param_grads, x_grad), out = output_and_grads(graphdef, params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  leaves = jax.tree.leaves(param_grads)
  assert leaves and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)
  assert np.all(np.isfinite(x_grad)) and np.any(x_grad != 0)


def test_linear_mixer_is_projections_around_the_op():
  mixer = LinearAttention(24, num_heads=4, num_kv_heads=2, variant="linear", rngs=nnx.Rngs(1))
  x = embeddings(1)
  q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (mixer.q, mixer.k, mixer.v))
  out = linear_attention(q, k, v, feature_map="elu+1", normalize=True)
  expected = jnp.einsum("bthk,hkd->btd", out, mixer.out[...])
  assert_close(mixer(x), expected, TOL_EXACT_F32, "linear mixer")


def test_gla_mixer_uses_data_dependent_vector_decay():
  mixer = LinearAttention(24, num_heads=2, variant="gla", rngs=nnx.Rngs(2))
  x = embeddings(2)
  q, k, v, gate = (
    jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (mixer.q, mixer.k, mixer.v, mixer.gate)
  )
  logits = jnp.einsum("btd,dr,rhk->bthk", x, mixer.decay_down[...], mixer.decay_up[...])
  log_decay = jax.nn.log_sigmoid(logits + mixer.decay_bias[...]) / 16
  out = rms_normalize(linear_attention(q, k, v, log_decay=log_decay)) * jax.nn.silu(gate)
  expected = jnp.einsum("bthk,hkd->btd", out, mixer.out[...])
  assert_close(mixer(x), expected, TOL_EXACT_F32, "gla mixer")


def test_mixer_rejects_bad_options_and_packed_sequences():
  with pytest.raises(ValueError, match="unknown"):
    LinearAttention(24, num_heads=4, variant="linear", rngs=nnx.Rngs(0), window=3)
  with pytest.raises(ValueError, match="serves variants"):
    LinearAttention(24, num_heads=4, variant="softmax", rngs=nnx.Rngs(0))
  mixer = LinearAttention(24, num_heads=4, variant="based", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="segment_ids"):
    mixer(embeddings(3), segment_ids=jnp.zeros((2, 11), jnp.int32))
