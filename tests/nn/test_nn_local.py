"""NNX mixers of the local-attention variants: protocol, equivalence to the op, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import registry
from attnjax.nn.local import LocalAttention, MultiAxisAttention
from attnjax.ops.neighborhood import neighborhood_attention
from tests.helpers import assert_close

MIXERS = {
  "neighborhood_1d": ("neighborhood", dict(kernel_size=5), 12),
  "neighborhood_2d": ("neighborhood", dict(kernel_size=3, spatial_shape=(4, 6)), 24),
  "halo": ("halo", dict(block_size=2, halo_size=1, spatial_shape=(4, 6)), 24),
  "maxvit": ("maxvit", dict(window_size=2, spatial_shape=(4, 6)), 24),
  "biformer": ("biformer", dict(region_size=2, topk=2, spatial_shape=(4, 6)), 24),
  "biformer_lce": (
    "biformer",
    dict(region_size=2, topk=2, spatial_shape=(4, 6), local_context=3),
    24,
  ),
}


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_protocol_and_gradients(name):
  variant, options, seq = MIXERS[name]
  cls = registry.mixer_class(variant)
  mixer = cls(16, num_heads=4, num_kv_heads=2, variant=variant, rngs=nnx.Rngs(0), **options)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, seq, 16))

  @nnx.jit
  def loss(mixer, x):
    return (mixer(x) ** 2).mean()

  grads = nnx.grad(loss)(mixer, x)
  assert nnx.jit(lambda mixer, x: mixer(x))(mixer, x).shape == x.shape
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)


def test_local_attention_is_projections_around_the_op():
  mixer = LocalAttention(12, num_heads=3, rngs=nnx.Rngs(2), spatial_shape=(5, 4), kernel_size=3)
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 20, 12))
  q, k, v = (
    jnp.einsum("btd,dhk->bthk", x, w[...]).reshape(1, 5, 4, 3, 4)
    for w in (mixer.q, mixer.k, mixer.v)
  )
  out = neighborhood_attention(q, k, v, kernel_size=3, impl="reference").reshape(1, 20, 3, 4)
  expected = jnp.einsum("bthk,hkd->btd", out, mixer.out[...])
  assert_close(nnx.jit(lambda mixer, x: mixer(x))(mixer, x), expected, 1e-4, "mixer vs op")


def test_local_context_enhancement_is_a_depthwise_convolution_of_v():
  mixer = LocalAttention(
    8, num_heads=4, num_kv_heads=2, variant="biformer", rngs=nnx.Rngs(5),
    spatial_shape=(4, 5), region_size=(2, 5), topk=1, local_context=3,
  )  # fmt: skip
  plain = LocalAttention(
    8, num_heads=4, num_kv_heads=2, variant="biformer", rngs=nnx.Rngs(5),
    spatial_shape=(4, 5), region_size=(2, 5), topk=1,
  )  # fmt: skip
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 20, 8))
  v = np.asarray(jnp.einsum("btd,dhk->bthk", x, mixer.v[...])).reshape(2, 4, 5, 2, 2)
  w = np.asarray(mixer.lce[...])  # [3, 3, kv_heads, head_dim]
  padded = np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  conv = sum(w[i, j] * padded[:, i : i + 4, j : j + 5] for i in range(3) for j in range(3))
  conv = np.repeat(conv, 2, axis=-2).reshape(2, 20, 4, 2)  # kv head of each query head
  extra = jnp.einsum("bthk,hkd->btd", conv, mixer.out[...])
  assert_close(mixer(x) - plain(x), extra, 1e-4, "lce contribution")


def test_local_context_needs_an_odd_width_and_a_grid():
  with pytest.raises(ValueError, match="local_context"):
    LocalAttention(8, num_heads=2, variant="biformer", rngs=nnx.Rngs(0), local_context=3)
  with pytest.raises(ValueError, match="local_context"):
    LocalAttention(
      8, num_heads=2, variant="biformer", rngs=nnx.Rngs(0), spatial_shape=(4, 4),
      local_context=4,
    )  # fmt: skip


def test_maxvit_mixer_has_two_sublayers():
  mixer = MultiAxisAttention(8, num_heads=2, rngs=nnx.Rngs(4), spatial_shape=(4, 4), window_size=2)
  assert mixer.block.variant_options != mixer.grid.variant_options


@pytest.mark.parametrize(
  "kwargs, call, message",
  [
    (dict(spatial_shape=(4, 4)), dict(seq=15), "spatial_shape"),
    (dict(), dict(seq=8, segment_ids=True), "segment_ids"),
    (dict(variant="softmax"), None, "local-attention"),
    (dict(spatial_shape=(2, 4), use_rope=True), None, "use_rope"),
  ],
)
def test_mixer_rejects_bad_use(kwargs, call, message):
  with pytest.raises(ValueError, match=message):
    mixer = LocalAttention(8, num_heads=2, rngs=nnx.Rngs(0), kernel_size=3, **kwargs)
    x = jnp.ones((1, call["seq"], 8))
    mixer(x, segment_ids=jnp.zeros((1, call["seq"]), jnp.int32) if "segment_ids" in call else None)


def test_1d_neighborhood_mixer_is_causal_by_default():
  mixer = LocalAttention(8, num_heads=2, rngs=nnx.Rngs(5), kernel_size=3)
  x = jax.random.normal(jax.random.PRNGKey(6), (1, 10, 8))
  changed_future = x.at[:, 6:].set(0.0)
  run = nnx.jit(lambda mixer, x: mixer(x))
  np.testing.assert_allclose(run(mixer, x)[:, :6], run(mixer, changed_future)[:, :6], rtol=1e-6)
