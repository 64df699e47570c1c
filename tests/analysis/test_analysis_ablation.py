"""Head masking against zeroing the output projection's rows, and the loss change table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from attnjax.analysis import head_ablation_loss_change, mask_heads
from attnjax.training.build import lm_loss
from tests.helpers import TOL_EXACT_F32, assert_close

VOCAB, SEQ, HEADS = 32, 13, 4


def _model(pattern):
  return nn.DecoderLM(
    vocab_size=VOCAB,
    embed_dim=32,
    depth=2,
    num_heads=HEADS,
    num_kv_heads=2,
    mlp_dim=32,
    layer_pattern=pattern,
    rngs=nnx.Rngs(0),
  )


def _zero_out_projection(model, layer, heads):
  """A copy of `model` whose layer `layer` output projection ignores `heads`."""
  copy = nnx.clone(model)
  out = copy.blocks[layer].mixer.out
  out[...] = out[...].at[jnp.asarray(heads)].set(0.0)
  return copy


def _tokens():
  return jax.random.randint(jax.random.key(2), (2, SEQ), 0, VOCAB)


forward = nnx.jit(lambda model, tokens: model(tokens))
loss = nnx.jit(lambda model, batch: lm_loss(model, batch)[0])


@pytest.mark.parametrize("pattern", ["softmax", "retention,gated"])
def test_masking_every_head_of_a_layer_zeroes_its_attention_output(pattern):
  model = _model(pattern)
  tokens = _tokens()
  for layer in (0, 1):
    with mask_heads(model, {layer: range(HEADS)}):
      masked = nnx.jit(lambda model, tokens: model(tokens))(model, tokens)
    expected = forward(_zero_out_projection(model, layer, list(range(HEADS))), tokens)
    assert_close(masked, expected, TOL_EXACT_F32, f"layer {layer}")
    assert not np.allclose(masked, forward(model, tokens))
  # Outside the context the model is intact.
  np.testing.assert_array_equal(forward(model, tokens), forward(_model(pattern), tokens))


def test_head_ablation_loss_change_matches_zeroed_heads():
  model = _model("softmax")
  tokens = _tokens()
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((2, SEQ - 1))}
  change = head_ablation_loss_change(model, batch, lm_loss)
  assert change.shape == (2, HEADS)
  base = float(loss(model, batch))
  for layer, head in [(0, 1), (1, 3)]:
    ablated = float(loss(_zero_out_projection(model, layer, [head]), batch))
    assert change[layer, head] == pytest.approx(ablated - base, rel=1e-4, abs=1e-5)
  only_last = head_ablation_loss_change(model, batch, lm_loss, layers=[1])
  assert np.isnan(only_last[0]).all()
  np.testing.assert_allclose(only_last[1], change[1], rtol=1e-5, atol=1e-6)


def test_mask_heads_rejects_bad_heads():
  model = _model("softmax")
  with pytest.raises(ValueError, match="layer 0"), mask_heads(model, {0: [HEADS]}):
    pass
  with pytest.raises(ValueError, match="layers"), mask_heads(model, {5: [0]}):
    pass
