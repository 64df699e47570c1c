"""`HGRN2Attention`: HGRN2's layer written from its equations with the mixer's own parameters,
its per-layer lower bounds, and a `DecoderLM` built on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax import registry
from attnjax.nn.linear import HGRN2Attention
from attnjax.nn.seq_parallel import SeqParallel
from attnjax.ops.linear import hgrn2
from tests.helpers import TOL_BLOCKED_F32, assert_close, seq_mesh

EMBED, HEADS, KV_HEADS, SEQ = 24, 4, 2, 11


def build(seed=0, **options):
  return registry.mixer_class("hgrn2")(
    EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, variant="hgrn2", rngs=nnx.Rngs(seed), **options
  )


def embeddings(seed, batch=2, seq=SEQ):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, seq, EMBED)), jnp.float32)


def project(x, weight):
  return jnp.einsum("btd,dhk->bthk", x, weight[...])


def hgru2(x, mixer, beta):
  """The layer token by token: HGRU2's recurrence (Eq. 3), then RMSNorm over heads and W_O."""
  o = jax.nn.silu(project(x, mixer.q))  # output gate [b, t, h, d]
  f = beta + (1 - beta) * jax.nn.sigmoid(project(x, mixer.k))  # forget gate [b, t, hk, d]
  i = project(x, mixer.v)  # input [b, t, hk, e]
  groups = HEADS // KV_HEADS
  f, i = jnp.repeat(f, groups, axis=2), jnp.repeat(i, groups, axis=2)
  h = jnp.zeros((x.shape[0], HEADS, f.shape[-1], i.shape[-1]))
  ys = []
  for t in range(x.shape[1]):
    h = f[:, t, :, :, None] * h + jnp.einsum("bhd,bhe->bhde", 1 - f[:, t], i[:, t])
    ys.append(jnp.einsum("bhd,bhde->bhe", o[:, t] * o.shape[-1] ** -0.5, h))
  y = jnp.stack(ys, axis=1)
  rms = jnp.sqrt(jnp.mean(y**2, axis=(-2, -1), keepdims=True) + 1e-6)
  return jnp.einsum("bthe,hed->btd", y / rms, mixer.out[...])


def test_registered_with_its_mixer_and_preset():
  variant = registry.get("hgrn2")
  assert variant.family == "linear" and "2404.07904" in variant.paper
  assert variant.module == "attnjax.nn.linear:HGRN2Attention"
  assert variant.preset is hgrn2.hgrn2_keywords and variant.capabilities.split == "state"
  assert isinstance(build(), HGRN2Attention)


@pytest.mark.parametrize("layer, num_layers", [(0, 1), (2, 4)])
def test_mixer_is_hgru2_with_rms_norm_and_out_projection(layer, num_layers):
  mixer = build(1, layer=layer, num_layers=num_layers, qk_dim=8)
  assert mixer.q.shape == (EMBED, HEADS, 8) and mixer.k.shape == (EMBED, KV_HEADS, 8)
  x = embeddings(1)
  beta = 0.0 if layer == 0 else jax.nn.sigmoid(mixer.lower_bound_logits[...])
  assert_close(mixer(x), hgru2(x, mixer, beta), TOL_BLOCKED_F32, f"layer {layer}")


def test_lower_bounds_start_at_the_papers_cumulative_softmax():
  num_layers = 4
  mixers = [build(layer=n, num_layers=num_layers) for n in range(num_layers)]
  assert mixers[0].lower_bound_logits is None and mixers[0].lower_bound() == 0.0
  for n, mixer in enumerate(mixers[1:], start=1):
    bound = mixer.lower_bound()
    assert bound.shape == (KV_HEADS, EMBED // HEADS)
    # The cumulative softmax of a zero-initialized [num_layers] parameter, from 0: n / L.
    np.testing.assert_allclose(bound, n / num_layers, rtol=1e-6)


def test_bounded_layer_learns_every_parameter_including_its_bound():
  mixer = build(3, layer=1, num_layers=2, impl="xla")
  graphdef, params = nnx.split(mixer)

  def loss(params, x):
    return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

  grads = jax.jit(jax.grad(loss))(params, embeddings(3))
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 5  # q (W_o), k (W_f), v (W_i), out, lower_bound_logits
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
def test_sequence_parallel_layer_equals_one_device_with_its_learned_bound(strategy):
  """The learned bound reaches the split op as a traced array through the variant's preset."""
  options = dict(layer=1, num_layers=3, impl="xla")
  split = build(4, seq_parallel=SeqParallel(seq_mesh(), linear=strategy), **options)
  plain = build(4, **options)
  x = embeddings(4, seq=16)  # 4 tokens per device

  def loss_and_grads(mixer):
    graphdef, params = nnx.split(mixer)

    def loss(params):
      out = nnx.merge(graphdef, params)(x)
      return jnp.mean(out**2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  ((_, out), grads), ((_, want), want_grads) = map(loss_and_grads, (split, plain))
  assert_close(out, want, TOL_BLOCKED_F32, strategy)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    assert_close(g, ref, 2 * TOL_BLOCKED_F32, f"{strategy} gradient")


def test_runs_in_a_decoder_lm_hybrid():
  model = aj.nn.DecoderLM(
    vocab_size=16,
    embed_dim=16,
    depth=2,
    num_heads=2,
    mlp_dim=0,
    rngs=nnx.Rngs(0),
    layer_pattern="hgrn2,softmax",
    mixer_options={"hgrn2": {"layer": 1, "num_layers": 2}},
  )
  assert isinstance(model.blocks[0].mixer, HGRN2Attention)
  logits = model(jnp.arange(7)[None] % 16)
  assert logits.shape == (1, 7, 16) and bool(jnp.all(jnp.isfinite(logits)))


def test_a_decoder_lm_gives_each_layer_its_depth_and_bound():
  def model(**options):
    return aj.nn.DecoderLM(vocab_size=16, embed_dim=16, depth=4, num_heads=2, mlp_dim=0,
                           rngs=nnx.Rngs(0), layer_pattern="softmax,hgrn2", **options)  # fmt: skip

  mixers = [block.mixer for block in model().blocks[1::2]]
  assert [(m.layer, m.num_layers) for m in mixers] == [(1, 4), (3, 4)]
  for mixer, bound in zip(mixers, (0.25, 0.75), strict=True):
    np.testing.assert_allclose(mixer.lower_bound(), np.full((2, 8), bound), rtol=1e-6)
  pinned = model(mixer_options={"hgrn2": {"layer": 0, "num_layers": 1}})
  assert all(block.mixer.lower_bound() == 0.0 for block in pinned.blocks[1::2])


def test_bad_layers_raise():
  with pytest.raises(ValueError, match="layer must be an index among num_layers=2"):
    build(layer=2, num_layers=2)
  with pytest.raises(ValueError, match="unknown"):
    build(temperature=2.0)
