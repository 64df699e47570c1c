"""LASP-2 and ZeCO linear attention vs the single-device op, for every decay kind."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import registry
from attnjax.ops import linear_attention
from attnjax.parallel import sequence_parallel, zeco
from tests.helpers import assert_close, random_normal, tolerance

AUTO = jax.sharding.AxisType.Auto
BATCH, SEQ, HEADS, KV_HEADS, DIM = 2, 32, 4, 2, 8


@functools.cache
def seq_mesh(parts=4):
  return jax.make_mesh((parts,), ("seq",), axis_types=(AUTO,), devices=jax.devices()[:parts])


def _log_decay(kind, key):
  shapes = {"const": (HEADS,), "scalar": (BATCH, SEQ, HEADS), "vector": (BATCH, SEQ, HEADS, DIM)}
  if kind == "none":
    return None
  return jnp.log(jax.random.uniform(key, shapes[kind], minval=0.7, maxval=1.0))


def _inputs(seed, dtype, kind):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = random_normal(keys[0], (BATCH, SEQ, HEADS, DIM), dtype)
  k = random_normal(keys[1], (BATCH, SEQ, KV_HEADS, DIM), dtype)
  v = random_normal(keys[2], (BATCH, SEQ, KV_HEADS, DIM), dtype)
  state = random_normal(keys[3], (BATCH, HEADS, DIM, DIM))
  d_out = random_normal(keys[4], (BATCH, SEQ, HEADS, DIM))
  return q, k, v, _log_decay(kind, keys[5]), state, d_out


def _value_and_grads(fn, q, k, v, log_decay, state, d_out, kwargs):
  def loss(q, k, v, log_decay, state):
    out, final = fn(
      q, k, v, log_decay=log_decay, initial_state=state, return_final_state=True, **kwargs
    )
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(jnp.sin(final)), (out, final)

  argnums = (0, 1, 2, 4) if log_decay is None else (0, 1, 2, 3, 4)
  grads, (out, final) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(
    q, k, v, log_decay, state
  )
  return out, final, grads


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
@pytest.mark.parametrize(
  "kind, dtype",
  [(kind, jnp.float32) for kind in ("none", "const", "scalar", "vector")]
  + [("vector", jnp.bfloat16)],
  ids=["none", "const", "scalar", "vector", "vector-bf16"],
)
def test_matches_single_device(strategy, kind, dtype):
  q, k, v, log_decay, state, d_out = _inputs(0, dtype, kind)
  kwargs = dict(chunk_size=4, impl="xla")
  sharded = sequence_parallel(linear_attention, seq_mesh(), strategy=strategy)
  out, final, grads = _value_and_grads(sharded, q, k, v, log_decay, state, d_out, kwargs)
  f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v)]
  reference = functools.partial(linear_attention, impl="reference")
  ref_out, ref_final, ref_grads = _value_and_grads(
    reference, *f32, log_decay, state, d_out, {"chunk_size": 4}
  )
  tol = tolerance(dtype)
  assert out.dtype == dtype
  assert_close(out, ref_out, tol, "out")
  assert_close(final, ref_final, tol, "final state")
  for i, (g, ref_g) in enumerate(zip(grads, ref_grads, strict=True)):
    assert_close(g, ref_g, 2 * tol, f"grad {i}")


@pytest.mark.parametrize("strategy", ["lasp2", "zeco", "lasp2h"])
def test_normalized_feature_map_without_initial_state(strategy):
  q, k, v, log_decay, _, _ = _inputs(1, jnp.float32, "scalar")
  kwargs = dict(log_decay=log_decay, feature_map="elu+1", normalize=True, chunk_size=8)
  sharded = sequence_parallel(linear_attention, seq_mesh(), strategy=strategy)
  out = sharded(q, k, v, impl="xla", **kwargs)
  ref = linear_attention(q, k, v, impl="reference", **kwargs)
  assert_close(out, ref, 1e-4, "out")


@pytest.mark.parametrize("pieces", [3, 8])
def test_zeco_pieces_on_8_devices(pieces):
  q, k, v, log_decay, state, _ = _inputs(2, jnp.float32, "vector")
  sharded = sequence_parallel(linear_attention, seq_mesh(8), strategy="zeco", pieces=pieces)
  kwargs = dict(log_decay=log_decay, initial_state=state, return_final_state=True)
  out, final = sharded(q, k, v, impl="xla", chunk_size=4, **kwargs)
  ref_out, ref_final = linear_attention(q, k, v, impl="reference", **kwargs)
  assert_close(out, ref_out, 1e-4, "out")
  assert_close(final, ref_final, 1e-4, "final state")


def test_zeco_piece_count_divides_key_dim():
  assert zeco._piece_count(12, 5) == 4
  assert zeco._piece_count(7, 4) == 1


def test_errors():
  q, k, v, _, _, _ = _inputs(3, jnp.float32, "none")
  with pytest.raises(ValueError, match="causal=True only"):
    sequence_parallel(linear_attention, seq_mesh(), strategy="lasp2")(q, k, v, causal=False)
  with pytest.raises(ValueError, match="seq_len=30"):
    sequence_parallel(linear_attention, seq_mesh(), strategy="zeco")(
      q[:, :30], k[:, :30], v[:, :30]
    )
  with pytest.raises(ValueError, match="not a linear strategy"):
    sequence_parallel(linear_attention, seq_mesh(), strategy="ring")
  with pytest.raises(ValueError, match="log_decay must be"):
    sequence_parallel(linear_attention, seq_mesh())(q, k, v, log_decay=jnp.zeros((2, 16, 4)))


def test_zeco_runs_the_pallas_kernel_per_shard():
  keys = jax.random.split(jax.random.key(5), 4)
  q, k, v = (random_normal(key, (1, 256, 2, 64)) for key in keys[:3])
  log_decay = jnp.log(jax.random.uniform(keys[3], (1, 256, 2), minval=0.9, maxval=1.0))
  sharded = sequence_parallel(linear_attention, seq_mesh(2), strategy="zeco")
  out = sharded(q, k, v, log_decay=log_decay, impl="pallas_interpret")
  ref = linear_attention(q, k, v, log_decay=log_decay, impl="reference")
  assert_close(out, ref, 1e-4, "out")


def test_registered_variants_presetting_the_op():
  q, k, v, _, _, _ = _inputs(4, jnp.float32, "none")
  gate_logits = random_normal(jax.random.key(7), (BATCH, SEQ, HEADS, DIM))
  out = sequence_parallel("gla", seq_mesh(), strategy="lasp2")(q, k, v, gate_logits=gate_logits)
  ref = registry.get("gla")(q, k, v, gate_logits=gate_logits, impl="reference")
  assert_close(out, ref, 1e-4, "gla")
  with pytest.raises(ValueError, match="got 'flowformer'"):
    sequence_parallel("flowformer", seq_mesh(), strategy="lasp2")


@pytest.mark.parametrize(
  "name, options", [("lightning", dict(layer=1, num_layers=3)), ("retention", {})]
)
def test_constant_decay_variants_get_their_decay_on_every_shard(name, options):
  q, k, v, _, _, _ = _inputs(5, jnp.float32, "none")
  variant = registry.get(name)
  out = sequence_parallel(name, seq_mesh(), strategy="zeco")(q, k, v, impl="xla", **options)
  assert_close(out, variant(q, k, v, impl="reference", **options), 1e-4, name)
  with pytest.raises(ValueError, match="computes its own log_decay"):
    sequence_parallel(name, seq_mesh())(q, k, v, log_decay=jnp.zeros(q.shape[2]))


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
def test_batch_axis_on_2d_mesh(strategy):
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AUTO, AUTO))
  q, k, v, log_decay, state, _ = _inputs(6, jnp.float32, "scalar")
  kwargs = dict(log_decay=log_decay, initial_state=state, return_final_state=True)
  sharded = sequence_parallel(linear_attention, mesh, strategy=strategy, batch_axes="data")
  out, final = sharded(q, k, v, impl="xla", chunk_size=4, **kwargs)
  ref_out, ref_final = linear_attention(q, k, v, impl="reference", **kwargs)
  assert_close(out, ref_out, 1e-4, "out")
  assert_close(final, ref_final, 1e-4, "final state")
