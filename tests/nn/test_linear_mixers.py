"""Mixers of `attnjax.nn.linear`: each equals its paper's layer written from its equations with
the mixer's own parameters, trains (finite, nonzero gradients) and rejects bad options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import registry
from attnjax.nn import DecoderLM
from attnjax.nn.linear import GatedLinearAttention, LinearAttention
from attnjax.nn.rope import apply_rope
from attnjax.ops.linear import decay
from attnjax.ops.softmax import agent
from tests.helpers import TOL_BLOCKED_F32, assert_close

EMBED, HEADS, KV_HEADS, SEQ = 24, 4, 2, 11
MIXER_VARIANTS = sorted(
  n for n in registry.names() if registry.get(n).module.startswith("attnjax.nn.linear:")
)


def embeddings(seed, batch=2, seq=SEQ):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, seq, EMBED)), jnp.float32)


def build(name, seed=0, **options):
  return registry.mixer_class(name)(
    EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, variant=name, rngs=nnx.Rngs(seed), **options
  )


def project(x, weight):
  return jnp.einsum("btd,dhk->bthk", x, weight[...])


def group_repeat(x):
  return jnp.repeat(x, HEADS // KV_HEADS, axis=2)


def decayed(q, k, v, log_decay=None, normalize=False):
  """Dense `o_t = sum_{s<=t} q_t . (prod_{s<r<=t} a_r) k_s v_s` (optionally row-normalized)."""
  k, v = group_repeat(k), group_repeat(v)
  cum = jnp.cumsum(jnp.zeros(q.shape) if log_decay is None else log_decay, axis=1)
  causal = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))[None, :, :, None, None]
  weight = jnp.where(causal, jnp.exp(cum[:, :, None] - cum[:, None, :]), 0.0)  # [b, t, s, h, f]
  scores = jnp.einsum("bthf,bshf,btshf->bhts", q, k, weight)
  if normalize:
    scores = scores / (scores.sum(-1, keepdims=True) + 1e-6)
  return jnp.einsum("bhts,bshv->bthv", scores, v)


def per_head_layer_norm(o, eps=1e-5):
  mean = o.mean(-1, keepdims=True)
  return (o - mean) / jnp.sqrt(((o - mean) ** 2).mean(-1, keepdims=True) + eps)


def out_projection(mixer, heads_out):
  return jnp.einsum("bthk,hkd->btd", heads_out, mixer.out[...])


@pytest.mark.parametrize("name", MIXER_VARIANTS)
def test_mixer_shape_and_finite_gradients(name):
  mixer = build(name, impl="xla")
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


def test_linear_is_katharopoulos_elu_features_without_scale():
  mixer = build("linear", 1)
  x = embeddings(1)
  q, k, v = (project(x, w) for w in (mixer.q, mixer.k, mixer.v))
  phi = lambda t: jax.nn.elu(t) + 1  # noqa: E731
  expected = out_projection(mixer, decayed(phi(q), phi(k), v, normalize=True))
  assert_close(mixer(x), expected, TOL_BLOCKED_F32, "linear")


def test_based_features_expand_exp_of_q_k_over_sqrt_feature_dim():
  mixer = build("based", 2, feature_dim=6)
  assert mixer.q.shape == (EMBED, HEADS, 6) and mixer.k.shape == (EMBED, KV_HEADS, 6)
  x = embeddings(2)
  q, k, v = (project(x, w) for w in (mixer.q, mixer.k, mixer.v))
  s = jnp.einsum("bthf,bshf->bhts", q, group_repeat(k)) / np.sqrt(6)
  weights = jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), 1 + s + s**2 / 2, 0.0)
  weights = weights / (weights.sum(-1, keepdims=True) + 1e-6)
  expected = out_projection(mixer, jnp.einsum("bhts,bshv->bthv", weights, group_repeat(v)))
  assert_close(mixer(x), expected, TOL_BLOCKED_F32, "based")


def test_lightning_is_srms_normed_swish_attention_times_its_gate():
  mixer = build("lightning", 3, layer=1, num_layers=4)
  x = embeddings(3)
  q, k, v, u = (project(x, w) for w in (mixer.q, mixer.k, mixer.v, mixer.gate))
  log_decay = jnp.broadcast_to(decay.lightning_log_decay(HEADS, 1, 4)[:, None], q.shape)
  o = decayed(jax.nn.silu(q), jax.nn.silu(k), v, log_decay)
  flat = o.reshape(*o.shape[:2], -1)  # SRMSNorm over all heads of a token
  o = o / jnp.sqrt((flat**2).mean(-1) + 1e-6)[..., None, None]
  assert_close(mixer(x), out_projection(mixer, o * u), TOL_BLOCKED_F32, "lightning")


def test_a_decoder_lm_gives_lightning_layers_the_decay_of_their_depth():
  model = DecoderLM(vocab_size=11, embed_dim=EMBED, depth=3, num_heads=HEADS, num_kv_heads=KV_HEADS,
                    mlp_dim=0, rngs=nnx.Rngs(0), layer_pattern="lightning")  # fmt: skip
  for index, block in enumerate(model.blocks):
    mixer, x = block.mixer, embeddings(index)
    assert dict(mixer.op_options) == {"layer": index, "num_layers": 3}
    q, k, v, u = (project(x, w) for w in (mixer.q, mixer.k, mixer.v, mixer.gate))
    log_decay = jnp.broadcast_to(decay.lightning_log_decay(HEADS, index, 3)[:, None], q.shape)
    o = decayed(jax.nn.silu(q), jax.nn.silu(k), v, log_decay)
    o = o / jnp.sqrt((o.reshape(*o.shape[:2], -1) ** 2).mean(-1) + 1e-6)[..., None, None]
    assert_close(mixer(x), out_projection(mixer, o * u), TOL_BLOCKED_F32, f"layer {index}")


def test_retention_is_rotary_retention_group_normed_and_swish_gated():
  mixer = build("retention", 4)
  x = embeddings(4)
  q, k, v, g = (project(x, w) for w in (mixer.q, mixer.k, mixer.v, mixer.gate))
  positions = jnp.arange(SEQ)
  q, k = apply_rope(q, positions), apply_rope(k, positions)
  gamma = 1 - 2.0 ** (-5.0 - np.arange(HEADS))
  log_decay = jnp.broadcast_to(jnp.log(gamma)[:, None], q.shape).astype(jnp.float32)
  y = per_head_layer_norm(decayed(q / np.sqrt(q.shape[-1]), k, v, log_decay))
  assert_close(mixer(x), out_projection(mixer, jax.nn.silu(g) * y), TOL_BLOCKED_F32, "retention")
  unrotated = build("retention", 4, use_rope=False)
  assert not np.allclose(unrotated(x), mixer(x))


def test_gla_is_its_low_rank_decay_with_a_per_head_norm_and_swish_gate():
  mixer = build("gla", 5)
  mixer.gate_bias[...] = jnp.linspace(-1.0, 1.0, mixer.gate_bias.size).reshape(
    mixer.gate_bias.shape
  )
  mixer.decay_bias[...] = jnp.full(mixer.decay_bias.shape, 2.0)
  x = embeddings(5)
  q, k, v = (project(x, w) for w in (mixer.q, mixer.k, mixer.v))
  decay_logits = (
    jnp.einsum("btd,dr,rhk->bthk", x, mixer.decay_down[...], mixer.decay_up[...])
    + mixer.decay_bias[...]
  )
  alpha = jax.nn.sigmoid(decay_logits) ** (1 / 16)
  o = per_head_layer_norm(decayed(q / np.sqrt(q.shape[-1]), k, v, jnp.log(alpha)))
  r = jax.nn.silu(project(x, mixer.gate) + mixer.gate_bias[...])
  assert_close(mixer(x), out_projection(mixer, r * o), TOL_BLOCKED_F32, "gla")


def test_agent_is_attention_projections_around_the_agent_op():
  mixer = build("agent", 6, num_agents=3)
  x = embeddings(6)
  q, k, v = (project(x, w) for w in (mixer.q, mixer.k, mixer.v))
  out = agent.agent_attention(q, k, v, num_agents=3, impl="reference")
  assert_close(mixer(x), out_projection(mixer, out), TOL_BLOCKED_F32, "agent")


def test_linear_mixers_take_their_ops_causal_option():
  x = embeddings(7)
  for name in ("linear", "gla", "retention", "lightning", "flowformer"):
    causal, bidirectional = build(name, causal=True), build(name, causal=False)
    assert not np.allclose(causal(x), bidirectional(x)), name


def test_mixers_reject_bad_options_variants_and_packed_sequences():
  with pytest.raises(ValueError, match="unknown"):
    build("linear", window=3)
  with pytest.raises(ValueError, match="unknown"):
    build("lightnet", causal=True)  # causal by construction: no causal option
  with pytest.raises(ValueError, match="does not serve variant 'softmax'"):
    LinearAttention(EMBED, num_heads=HEADS, variant="softmax", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not serve variant 'gla'"):
    LinearAttention(EMBED, num_heads=HEADS, variant="gla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="even"):
    build("retention", qk_dim=5)
  assert isinstance(build("gla"), GatedLinearAttention)
  for name in ("based", "agent"):
    with pytest.raises(ValueError, match="segment_ids"):
      build(name)(embeddings(8), segment_ids=jnp.zeros((2, SEQ), jnp.int32))
