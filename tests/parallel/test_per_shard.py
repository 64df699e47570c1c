"""`per_shard`: attention ops per batch shard on a {"data": 4, "tensor": 2} mesh of 8 CPUs."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attnjax import masks, nn, registry
from attnjax.nn.seq_parallel import SeqParallel
from attnjax.ops import dot_product_attention, linear_attention
from attnjax.parallel.per_shard import per_shard
from tests.helpers import assert_close, random_normal, value_and_grads

AUTO = jax.sharding.AxisType.Auto
TOL = 1e-5  # the same float32 function per shard


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AUTO, AUTO))


def _qkv(key, batch=8, seq=13, heads=4, kv_heads=2, head_dim=12):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    random_normal(kq, (batch, seq, heads, head_dim)),
    random_normal(kk, (batch, seq, kv_heads, head_dim)),
    random_normal(kv, (batch, seq, kv_heads, head_dim)),
  )


def _assert_same(op, args: tuple, kwargs: dict, what: str) -> None:
  """`per_shard(op)` equals `op`: outputs within `TOL`, gradients within `2 * TOL`."""
  out, grads = value_and_grads(per_shard(op, _mesh(), ("data",)), args, kwargs)
  ref_out, ref_grads = value_and_grads(op, args, kwargs)
  for x, ref in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out), strict=True):
    assert x.shape == ref.shape
    assert_close(x, ref, TOL, f"{what}: output")
  for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
    assert_close(g, ref, 2 * TOL, f"{what}: gradient of float input {i}")


def test_dot_product_attention_with_sinks_and_segment_ids():
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = _qkv(keys[0])
  sinks = random_normal(keys[1], (4,))  # [heads]: replicated
  segment_ids = jnp.cumsum(jax.random.bernoulli(keys[2], 0.2, q.shape[:2]), axis=1)
  kwargs = dict(
    mask=masks.causal(), sinks=sinks, segment_ids=segment_ids, return_lse=True, impl="xla"
  )
  _assert_same(dot_product_attention, (q, k, v), kwargs, "dot_product_attention")


def test_linear_attention_with_log_decay_and_final_state():
  keys = jax.random.split(jax.random.key(2), 2)
  q, k, v = _qkv(keys[0], seq=11)
  log_decay = -jax.nn.softplus(random_normal(keys[1], (8, 11, 4)))  # [batch, seq, heads]
  kwargs = dict(log_decay=log_decay, return_final_state=True, chunk_size=4, impl="xla")
  _assert_same(linear_attention, (q, k, v), kwargs, "linear_attention")


@pytest.mark.parametrize("name", ["selective", "sinks", "gated", "disentangled"])
def test_variant_with_extra_arrays(name):
  """Per-token arrays (selective, gated) split; parameters (sinks; disentangled's relative
  embeddings `[8, heads, dim]`, leading with the batch size 8) replicated."""
  variant = registry.get(name)
  args, kwargs = variant.example_inputs(jax.random.key(3), batch=8, seq=13)
  impl = "xla" if "xla" in variant.impl_names else "reference"
  _assert_same(variant, args, {**kwargs, "impl": impl}, name)


def test_batch_not_divisible_by_batch_axes_raises():
  q, k, v = _qkv(jax.random.key(4), batch=6)
  attn = per_shard(dot_product_attention, _mesh(), ("data", "tensor"))
  with pytest.raises(ValueError, match=r"\('data', 'tensor'\).*batch=6"):
    attn(q, k, v)


def test_output_without_batch_dim_raises():
  q, k, v = _qkv(jax.random.key(5))
  attn = per_shard(lambda q, k, v: jnp.mean(q), _mesh(), ("data",))
  with pytest.raises(ValueError, match=r"output of shape \(\)"):
    jax.jit(attn)(q, k, v)


@pytest.mark.parametrize(
  "pattern, mixer_options",
  [
    ("aaren", None),
    ("diffqkv", None),
    ("gaussian", None),
    ("neighborhood", {"neighborhood": {"kernel_size": 5}}),
    ("maxvit", {"maxvit": {"spatial_shape": (4, 4), "window_size": 2}}),
  ],
)
def test_model_mixers_run_their_op_per_batch_shard(pattern, mixer_options):
  """A DecoderLM on a data=8 x seq=1 mesh calls each mixer's op under `shard_map`, and its
  logits equal those of the same model without the context."""
  mesh = jax.make_mesh((8, 1), ("data", "seq"), axis_types=(AUTO, AUTO))

  def build(seq_parallel):
    return nn.DecoderLM(
      vocab_size=32,
      embed_dim=32,
      depth=1,
      mlp_dim=64,
      num_heads=4,
      num_kv_heads=2,
      layer_pattern=pattern,
      mixer_options=mixer_options,
      seq_parallel=seq_parallel,
      rngs=nnx.Rngs(0),
    )

  sharded, plain = build(SeqParallel(mesh, batch_axes=("data",))), build(None)
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 32)
  assert "shard_map" in str(jax.make_jaxpr(lambda t: sharded(t))(tokens))
  assert_close(nnx.jit(lambda m, t: m(t))(sharded, tokens), plain(tokens), TOL, pattern)
