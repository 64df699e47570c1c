"""The ring's zigzag layout: relayout helpers, ring on zigzag-ordered arrays, and models that
lay their sequence out once (4 of 8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn
from attnjax.nn.seq_parallel import SeqParallel
from attnjax.ops import dot_product_attention, linear_attention
from attnjax.parallel import comms, layout, sequence_parallel
from tests.helpers import assert_close, random_normal, seq_mesh

PARTS = 4
VOCAB, EMBED, HEADS, KV_HEADS = 32, 16, 2, 1


def test_to_and_from_zigzag_permute_the_global_sequence():
  x = random_normal(jax.random.key(0), (2, 32, 3))
  order = layout.positions(32, PARTS, "zigzag")
  assert sorted(order) == list(range(32)) and list(order[:4]) == [0, 1, 2, 3]
  zigzag = jax.jit(lambda x: layout.to_zigzag(x, seq_mesh()))(x)
  np.testing.assert_array_equal(zigzag, x[:, order])
  np.testing.assert_array_equal(layout.from_zigzag(zigzag, seq_mesh()), x)
  np.testing.assert_array_equal(layout.positions(32, PARTS, "natural"), np.arange(32))
  with pytest.raises(ValueError, match="2 x 4 zigzag chunks"):
    layout.to_zigzag(x[:, :28], seq_mesh())
  with pytest.raises(ValueError, match="layout must be one of"):
    layout.positions(32, PARTS, "striped")


def test_ring_on_zigzag_ordered_arrays_with_true_position_masks_and_segments():
  keys = jax.random.split(jax.random.key(1), 3)
  q = random_normal(keys[0], (1, 32, 4, 8))
  k, v = (random_normal(key, (1, 32, 2, 8)) for key in keys[1:])
  ids = jnp.asarray([[0] * 11 + [1] * 21])
  order = layout.positions(32, PARTS, "zigzag")
  for mask in (masks.causal(), masks.sliding_window(5) | masks.sinks(3)):
    ref = dot_product_attention(q, k, v, mask=mask, segment_ids=ids, impl="reference")
    ring = sequence_parallel(dot_product_attention, seq_mesh(), strategy="ring", layout="zigzag")
    ordered = (x[:, order] for x in (q, k, v))
    out = ring(*ordered, mask=mask, segment_ids=ids[:, order], impl="reference")
    assert_close(out, ref[:, order], 1e-5, "out")


def test_only_the_ring_takes_the_zigzag_layout():
  for op, strategy in ((dot_product_attention, "allgather"), (linear_attention, "lasp2")):
    with pytest.raises(ValueError, match=f"strategy '{strategy}' takes the sequence in natural"):
      sequence_parallel(op, seq_mesh(), strategy=strategy, layout="zigzag")
  ring = sequence_parallel(
    dot_product_attention, seq_mesh(), strategy="ring", zigzag=False, layout="zigzag"
  )
  x = jnp.ones((1, 32, 2, 8))
  with pytest.raises(ValueError, match="layout='zigzag' needs zigzag=True"):
    ring(x, x, x, mask=masks.causal())


def _lm(pattern: str, seq_parallel=None, depth: int = 2):
  return nn.DecoderLM(
    vocab_size=VOCAB,
    embed_dim=EMBED,
    depth=depth,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    mlp_dim=24,
    layer_pattern=pattern,
    seq_parallel=seq_parallel,
    rngs=nnx.Rngs(0),
  )


def _logits_and_grads(model, tokens, segment_ids):
  weights = random_normal(jax.random.key(2), (*tokens.shape, VOCAB))

  @nnx.jit
  def run(model):
    def loss(model):
      logits = model(tokens, segment_ids=segment_ids)
      return jnp.sum(logits * weights), logits

    return nnx.grad(loss, has_aux=True)(model)

  grads, logits = run(model)
  return logits, nnx.to_pure_dict(grads)


def test_all_ring_model_logits_and_gradients_match_one_device():
  """Zigzag layout end to end: packed sequences, rotary angles at true positions, two masks."""
  tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, VOCAB)
  segment_ids = jnp.asarray(np.repeat([[0] * 13 + [1] * 19], 2, axis=0))
  model = _lm("softmax,sliding_window", SeqParallel(seq_mesh()))
  assert model.seq_parallel.layout == "zigzag"
  assert all(block.mixer.seq_parallel == model.seq_parallel for block in model.blocks)
  logits, grads = _logits_and_grads(model, tokens, segment_ids)
  ref_logits, ref_grads = _logits_and_grads(_lm("softmax,sliding_window"), tokens, segment_ids)
  assert_close(logits, ref_logits, 1e-5, "logits")
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref_grads)
  for (path, ref_grad), grad in zip(ref_leaves, jax.tree.leaves(grads), strict=True):
    assert_close(grad, ref_grad, 2e-5, jax.tree_util.keystr(path))


@pytest.mark.parametrize(
  "pattern, softmax", [("softmax,gla", "ring"), ("softmax", "allgather")], ids=["gla", "allgather"]
)
def test_models_with_a_layer_needing_natural_order_keep_it(pattern, softmax):
  """Values of such models: tests/parallel/test_seq_parallel_train.py."""
  model = nnx.eval_shape(lambda: _lm(pattern, SeqParallel(seq_mesh(), softmax=softmax)))
  assert model.seq_parallel.layout == "natural"
  assert all(block.mixer.seq_parallel.layout == "natural" for block in model.blocks)
  with pytest.raises(ValueError, match="strategy 'lasp2' takes the sequence in natural order"):
    SeqParallel(seq_mesh(), layout="zigzag").check("gla")


def _forward_bytes(model, seq_len: int) -> float:
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  graph, params = nnx.split(model)
  forward = jax.jit(lambda params, tokens: nnx.merge(graph, params)(tokens))
  compiled = forward.lower(params, tokens).compile()
  return comms.bytes_sent_per_device(comms.collectives(compiled.as_text(), PARTS), PARTS)


def test_all_ring_model_sends_kv_per_layer_and_relayouts_once():
  """Forward bytes: K/V's P - 1 hops per layer, plus one shard of tokens in, hidden states out."""
  seq_len, depth = 256, 3
  shard = seq_len // PARTS
  kv_hops = (PARTS - 1) * shard * 2 * KV_HEADS * (EMBED // HEADS) * 4
  relayout_once = shard * 4 + shard * EMBED * 4
  zigzag = _forward_bytes(_lm("softmax", SeqParallel(seq_mesh()), depth), seq_len)
  assert zigzag == depth * kv_hops + relayout_once
