"""DecoderLM: layer patterns build the right mixers, causality, logical axis names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from attnjax.nn.params import LOGICAL_AXES


def _lm(**kwargs):
  defaults = dict(vocab_size=32, embed_dim=16, depth=2, num_heads=2, mlp_dim=24, rngs=nnx.Rngs(0))
  return nn.DecoderLM(**{**defaults, **kwargs})


@pytest.mark.parametrize(
  "pattern,depth,expected",
  [
    ("softmax", 3, ("softmax",) * 3),
    ("sliding_window*3,softmax", 8, (("sliding_window",) * 3 + ("softmax",)) * 2),
    (["chunked", "softmax"], 2, ("chunked", "softmax")),
  ],
)
def test_parse_layer_pattern(pattern, depth, expected):
  assert nn.parse_layer_pattern(pattern, depth) == expected


@pytest.mark.parametrize(
  "pattern,depth,match",
  [
    ("softmax,softmax,softmax", 4, "multiple of the layer_pattern length 3"),
    ("softmax,nope", 2, r"unknown variants \['nope'\]"),
    ("softmax*x", 2, "name\\*count"),
  ],
)
def test_bad_layer_pattern_is_a_clear_error(pattern, depth, match):
  with pytest.raises(ValueError, match=match):
    nn.parse_layer_pattern(pattern, depth)


def test_hybrid_pattern_builds_the_named_mixers_with_their_options():
  model = nnx.eval_shape(
    lambda: _lm(
      depth=4,
      layer_pattern="sliding_window,softmax",
      mixer_options={"sliding_window": {"window": 3}},
    )
  )
  assert model.layer_names == ("sliding_window", "softmax") * 2
  for block, name in zip(model.blocks, model.layer_names, strict=True):
    assert isinstance(block.mixer, nn.Attention)
    assert block.mixer.variant == name
    assert dict(block.mixer.variant_options) == ({"window": 3} if name == "sliding_window" else {})
  with pytest.raises(ValueError, match="no layer"):
    _lm(layer_pattern="softmax", mixer_options={"chunked": {"chunk_size": 4}})


def test_logits_are_causal_and_finite():
  model = _lm(layer_pattern="softmax")
  forward = nnx.jit(lambda model, tokens: model(tokens))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
  logits = forward(model, tokens)
  assert logits.shape == (2, 9, 32) and logits.dtype == jnp.float32
  changed = forward(model, tokens.at[:, 5].set((tokens[:, 5] + 1) % 32))
  np.testing.assert_array_equal(logits[:, :5], changed[:, :5])
  assert np.abs(logits[:, 5:] - changed[:, 5:]).max() > 1e-4


def test_tied_and_untied_heads_and_logical_axes():
  tied, untied = nnx.eval_shape(lambda: (_lm(tie_embeddings=True), _lm(tie_embeddings=False)))
  assert tied.head is None and untied.head.shape == (16, 32)
  specs = jax.tree.leaves(
    nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(untied))),
    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
  )
  assert specs and all(name in LOGICAL_AXES for spec in specs for name in spec)
  no_mlp = nnx.eval_shape(lambda: _lm(mlp_dim=0))
  assert all(block.mlp is None for block in no_mlp.blocks)
