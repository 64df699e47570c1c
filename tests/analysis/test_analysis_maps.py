"""attention_maps against independently computed attention weights, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn, registry
from attnjax.analysis import attention_maps
from attnjax.analysis.maps import NEUTRALIZERS, weight_matrix
from attnjax.nn.rope import apply_rope
from attnjax.ops.linear import decay
from configs.mqar import VARIANT_OPTIONS
from tests.helpers import TOL_EXACT_F32, assert_close

VOCAB, SEQ = 40, 19  # odd length


def _model(pattern, *, num_kv_heads=None, head_dim=None, embed_dim=48, depth=2, **options):
  names = {n.strip() for n in pattern.split(",")}
  mixer_options = {n: {**VARIANT_OPTIONS.get(n, {}), **options} for n in names}
  return nn.DecoderLM(
    vocab_size=VOCAB,
    embed_dim=embed_dim,
    depth=depth,
    num_heads=4,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    mlp_dim=32,
    layer_pattern=pattern,
    mixer_options={n: o for n, o in mixer_options.items() if o},
    rngs=nnx.Rngs(0),
  )


def _tokens(batch=2, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)


@nnx.jit
def _layer_inputs(model, tokens):
  """The normed input of each block's mixer, through the model's own blocks."""
  x = jnp.take(model.embed[...], tokens, axis=0)
  inputs = []
  for block in model.blocks:
    inputs.append(block.mixer_norm(x))
    x = block(x)
  return inputs


def _softmax_probs(q, k, allowed, extra_logits=None):
  """Dense probabilities `[b, h, q, k]` of `q [b, t, h, d]`, `k [b, s, hk, d]` by hand;
  `extra_logits [b, h, q, n]` join the softmax as keys that are not returned."""
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(allowed, logits, -jnp.inf)
  if extra_logits is None:
    return jax.nn.softmax(logits, axis=-1)
  probs = jax.nn.softmax(jnp.concatenate([logits, extra_logits], axis=-1), axis=-1)
  return probs[..., : logits.shape[-1]]


CAUSAL = np.tril(np.ones((SEQ, SEQ), bool))


@pytest.mark.parametrize(
  "pattern, num_kv_heads, head_dim",
  [("softmax", 2, 60), ("gated", None, None)],
  ids=["softmax-gqa-hd60", "gated"],
)
def test_softmax_maps_are_probabilities_of_each_layer(pattern, num_kv_heads, head_dim):
  model = _model(pattern, num_kv_heads=num_kv_heads, head_dim=head_dim)
  tokens = _tokens()
  maps = attention_maps(model, tokens)
  assert sorted(maps) == [0, 1]
  for layer, x in enumerate(_layer_inputs(model, tokens)):
    _, q, k, _ = model.blocks[layer].mixer.project_qkv(x)
    expected = _softmax_probs(q, k, CAUSAL)
    assert maps[layer].shape == (2, 4, SEQ, SEQ) and maps[layer].dtype == jnp.float32
    assert_close(maps[layer], expected, TOL_EXACT_F32, f"layer {layer}")
    np.testing.assert_allclose(maps[layer].sum(-1), 1.0, atol=1e-5)


def test_packed_documents_attend_only_within_their_segment():
  model = _model("softmax", depth=1)
  segment_ids = jnp.asarray([[0] * 7 + [1] * (SEQ - 7), [0] * SEQ])
  (weights,) = attention_maps(model, _tokens(), segment_ids=segment_ids).values()
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(weights[0, :, 7:, :7], 0.0)
  assert float(weights[1, :, 7:, :7].min()) > 0.0


@pytest.mark.parametrize("num_sink_tokens", [0, 2])
def test_sink_maps_leave_the_sink_share_out_of_each_row(num_sink_tokens):
  model = _model("sinks", depth=1, num_sink_tokens=num_sink_tokens)
  mixer = model.blocks[0].mixer
  mixer.sinks[...] = jnp.linspace(-1.0, 3.0, 4)
  tokens = _tokens()
  (x,) = _layer_inputs(model, tokens)
  _, q, k, _ = mixer.project_qkv(x)
  extra = jnp.broadcast_to(mixer.sinks[...][None, :, None, None], (2, 4, SEQ, 1))
  if num_sink_tokens:  # learned sink tokens: keys without rotary positions
    sink_k = jnp.repeat(mixer.sink_k[...], 4 // mixer.sink_k.shape[1], axis=1)
    token_logits = jnp.einsum("bqhd,nhd->bhqn", q, sink_k) / np.sqrt(q.shape[-1])
    extra = jnp.concatenate([extra, token_logits], axis=-1)
  expected = _softmax_probs(q, k, CAUSAL, extra)
  maps = attention_maps(model, tokens)
  assert_close(maps[0], expected, TOL_EXACT_F32)
  assert float(maps[0].sum(-1).max()) < 1.0  # the sinks take a share of every row


def _linear_weights(mixer, x, *, normalize, log_decay=None):
  """`[b, h, t, s]` causal weights of linear attention computed by hand from the mixer."""
  q, k = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (mixer.q, mixer.k))
  if getattr(mixer, "use_rope", False):  # retention: RetNet's rotary positions e^(i n theta)
    positions = jnp.arange(x.shape[1])
    q, k = (apply_rope(y, positions, base=mixer.rope_base) for y in (q, k))
  if normalize:  # `linear`: elu+1 features, rows divided by their sum (+ eps)
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  scores = jnp.einsum("bthf,bshf->bhts", q, k) * q.shape[-1] ** -0.5
  if log_decay is not None:  # constant per-head decay a^(t - s)
    distance = jnp.arange(SEQ)[:, None] - jnp.arange(SEQ)[None, :]
    scores = scores * jnp.exp(log_decay[:, None, None] * jnp.maximum(distance, 0))
  scores = jnp.where(CAUSAL, scores, 0.0)
  if normalize:
    scores = scores / (scores.sum(-1, keepdims=True) + 1e-6)
  return scores


@pytest.mark.parametrize("variant", ["linear", "retention"])
def test_linear_maps_are_the_equivalent_causal_weights(variant):
  model = _model(variant)
  tokens = _tokens()
  maps = attention_maps(model, tokens)
  log_decay = jnp.asarray(decay.retention_log_decay(4)) if variant == "retention" else None
  for layer, x in enumerate(_layer_inputs(model, tokens)):
    expected = _linear_weights(
      model.blocks[layer].mixer, x, normalize=variant == "linear", log_decay=log_decay
    )
    assert_close(maps[layer], expected, TOL_EXACT_F32, f"{variant} layer {layer}")


def test_hybrid_maps_only_the_requested_layers():
  model = _model("retention,softmax")
  maps = attention_maps(model, _tokens(), layers=[1])
  assert list(maps) == [1]
  np.testing.assert_allclose(maps[1].sum(-1), 1.0, atol=1e-5)


# Variants whose op output is exactly `weights @ v` (no gate, routing or value scaling).
PLAIN = sorted(n for n, f in NEUTRALIZERS.items() if f.__name__ == "_unchanged")


@pytest.mark.parametrize("variant", PLAIN)
def test_maps_times_values_reproduce_the_op_output(variant):
  var = registry.get(variant)
  args, options = var.example_inputs(jax.random.key(3), batch=1, seq=11, heads=4, head_dim=8)
  causal = var.capabilities.causal_options() or {}
  kwargs = {**var.defaults, **options, **causal, "impl": "reference"}
  weights = weight_matrix(var, args, kwargs)
  out = var.op(*args, **kwargs)
  v = args[2]
  grouped_v = jnp.repeat(v, out.shape[2] // v.shape[2], axis=2)
  assert_close(jnp.einsum("bhts,bshd->bthd", weights, grouped_v), out, 1e-4, variant)


def test_the_registry_hook_is_removed_even_when_the_forward_fails():
  model = _model("softmax", depth=1)
  with pytest.raises(ValueError, match="tokens"):
    attention_maps(model, jnp.zeros((SEQ,), jnp.int32))
  assert not registry._CALL_HOOKS


def test_attention_maps_rejects_bad_arguments():
  with pytest.raises(ValueError, match="'gaussian'"):
    attention_maps(_model("gaussian", depth=1), _tokens())
  with pytest.raises(ValueError, match="layers"):
    attention_maps(_model("softmax"), _tokens(), layers=[2])
  with pytest.raises(ValueError, match="blocks"):
    attention_maps(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _tokens())
