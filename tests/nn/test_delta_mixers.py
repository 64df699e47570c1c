"""The delta-rule mixer (`attnjax.nn.delta.DeltaNet`): equals DeltaNet's and Gated DeltaNet's
layers written from their equations with the mixer's own parameters, restarts at document
starts, is causal, trains inside a DecoderLM and rejects bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn, registry
from attnjax.ops.delta import api
from tests.helpers import TOL_BLOCKED_F32, assert_close

EMBED, HEADS, KV_HEADS, SEQ = 24, 4, 2, 13
VARIANTS = ["deltanet", "gated_deltanet"]


def _x(seed, batch=2, seq=SEQ):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, seq, EMBED)), jnp.float32)


def _build(name, **options):
  return registry.mixer_class(name)(
    EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, variant=name, rngs=nnx.Rngs(0), **options
  )


def _layer_from_equations(m, x, name):
  """The papers' layer, step by step, from the mixer's parameters (no segments)."""

  def conv_silu(weight, conv_weight):
    y = jnp.einsum("btd,dhk->bthk", x, weight[...])
    flat = y.reshape(*y.shape[:2], -1)
    taps = conv_weight[...]
    mixed = sum(
      taps[lag] * jnp.pad(flat, [(0, 0), (lag, 0), (0, 0)])[:, : flat.shape[1]]
      for lag in range(taps.shape[0])
    )
    return jax.nn.silu(mixed).reshape(y.shape)

  q, k, v = conv_silu(m.q, m.q_conv), conv_silu(m.k, m.k_conv), conv_silu(m.v, m.v_conv)
  q, k = (z / jnp.sqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-6) for z in (q, k))
  beta = jax.nn.sigmoid(x @ m.beta[...])
  log_decay = None
  if name == "gated_deltanet":
    dt = jax.nn.softplus(x @ m.decay[...] + m.dt_bias[...])
    log_decay = -jnp.exp(m.a_log[...]) * dt
  o = api.delta_rule_attention(q, k, v, beta, log_decay=log_decay, impl="reference")
  o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-6) * m.norm[...]
  if name == "gated_deltanet":
    o = o * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, m.gate[...]))
  return jnp.einsum("bthk,hkd->btd", o, m.out[...])


@pytest.mark.parametrize("name", VARIANTS)
def test_mixer_is_the_papers_layer(name):
  m, x = _build(name, impl="xla", chunk_size=4), _x(0)
  assert_close(m(x), _layer_from_equations(m, x, name), TOL_BLOCKED_F32, name)


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_documents_equal_separate_calls_and_the_layer_is_causal(name):
  m, x = _build(name, chunk_size=4), _x(1)
  cut = 6
  ids = jnp.asarray(np.repeat([[0, 1]], [cut, SEQ - cut], axis=1).repeat(2, axis=0))
  packed = m(x, segment_ids=ids)
  assert_close(packed[:, :cut], m(x[:, :cut]), TOL_BLOCKED_F32, "first document")
  assert_close(packed[:, cut:], m(x[:, cut:]), TOL_BLOCKED_F32, "second document")
  changed = x.at[:, cut:].set(_x(2)[:, cut:])
  np.testing.assert_allclose(m(changed)[:, :cut], m(x)[:, :cut], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_trains_in_a_decoder_lm_with_softmax_layers(name):
  model = nn.DecoderLM(
    vocab_size=17, embed_dim=EMBED, depth=2, num_heads=HEADS, num_kv_heads=KV_HEADS,
    mlp_dim=32, layer_pattern=f"{name},softmax", rngs=nnx.Rngs(0),
  )  # fmt: skip
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 17, (2, SEQ)))

  def loss(model):
    logits = model(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = nnx.grad(loss)(model)
  mixer_grads = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(np.isfinite(np.asarray(g)).all() for g in mixer_grads)
  delta_layer = [
    g for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)) if "beta" in map(str, path)
  ]
  assert delta_layer and all(np.abs(np.asarray(g.get_value())).max() > 0 for g in delta_layer)


def test_bad_input_is_a_value_error():
  m = _build("deltanet")
  with pytest.raises(ValueError, match="x must be"):
    m(jnp.ones((2, SEQ, EMBED + 1)))
  with pytest.raises(ValueError, match="conv_width"):
    _build("deltanet", conv_width=0)
  with pytest.raises(ValueError, match="does not serve"):
    registry.mixer_class("deltanet")(EMBED, num_heads=HEADS, variant="gla", rngs=nnx.Rngs(0))
