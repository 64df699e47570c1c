"""Ring / all-gather / Ulysses softmax attention vs the single-device op, on 4 of 8 CPUs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks, registry
from attnjax.ops import dot_product_attention
from attnjax.parallel import ring, sequence_parallel
from tests.helpers import assert_close, random_normal, seq_mesh, tolerance

AUTO = jax.sharding.AxisType.Auto


def _inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = random_normal(keys[0], (batch, seq, heads, head_dim), dtype)
  k = random_normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
  v = random_normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
  d_out = random_normal(keys[3], (batch, seq, heads, head_dim))
  return q, k, v, d_out


def _value_and_grads(fn, q, k, v, d_out, kwargs):
  def loss(q, k, v):
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(jnp.sin(finite_lse)), (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


def _check(strategy, q, k, v, d_out, *, impl="reference", mesh=None, options=None, **kwargs):
  sharded = sequence_parallel(
    dot_product_attention, mesh or seq_mesh(), strategy=strategy, **(options or {})
  )
  out, lse, grads = _value_and_grads(functools.partial(sharded, impl=impl), q, k, v, d_out, kwargs)
  as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = functools.partial(dot_product_attention, impl="reference")
  ref_out, ref_lse, ref_grads = _value_and_grads(ref, *as_f32, d_out, kwargs)
  tol = tolerance(q.dtype)
  assert out.dtype == q.dtype and out.shape == ref_out.shape
  assert_close(out, ref_out, tol, "out")
  assert_close(lse, ref_lse, tol, "lse")
  for name, g, ref_g in zip("qkv", grads, ref_grads, strict=True):
    assert g.dtype == q.dtype
    assert_close(g, ref_g, 2 * tol, f"d{name}")


STRATEGIES = ["ring", "ring_contiguous", "allgather", "ulysses"]


def _strategy(name):
  if name == "ring_contiguous":
    return "ring", {"zigzag": False}
  return name, {}


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(
  "mask",
  [masks.causal(), masks.sliding_window(5) | masks.sinks(3), masks.prefix_lm(13)],
  ids=["causal", "window_sinks", "prefix_lm"],
)
def test_matches_single_device_gqa(name, mask):
  strategy, options = _strategy(name)
  q, k, v, d_out = _inputs(0, 2, 32, 4, 2, 12, jnp.float32)
  _check(strategy, q, k, v, d_out, mask=mask, options=options)


@pytest.mark.parametrize("name", ["ring", "allgather", "ulysses"])
def test_segment_ids_and_padding_without_mask(name):
  strategy, options = _strategy(name)
  q, k, v, d_out = _inputs(1, 2, 32, 4, 4, 8, jnp.float32)
  ids = jnp.asarray(np.repeat([[0, 1, 1, 2, 2, 2, 3, 3]], 2, axis=0).repeat(4, axis=1))
  segments = masks.SegmentIds(ids, padding_id=3)  # the last 8 tokens are padding: zero rows
  _check(strategy, q, k, v, d_out, segment_ids=segments, options=options)


@pytest.mark.parametrize("name", ["ring", "allgather", "ulysses"])
def test_bfloat16_head_dim_60(name):
  strategy, options = _strategy(name)
  q, k, v, d_out = _inputs(2, 1, 32, 4, 1, 60, jnp.bfloat16)
  _check(strategy, q, k, v, d_out, mask=masks.causal(), options=options)


@pytest.mark.parametrize("name", ["ring", "allgather"])
def test_blockwise_impl_softcap_and_sinks(name):
  q, k, v, d_out = _inputs(3, 1, 48, 4, 2, 8, jnp.float32)
  sinks = jax.random.normal(jax.random.key(9), (4,))
  sharded = sequence_parallel(dot_product_attention, seq_mesh(), strategy=name)
  kwargs = dict(mask=masks.causal(), softcap=5.0, sinks=sinks)
  fn = functools.partial(sharded, impl="xla", block_sizes=None)
  out, lse, grads = _value_and_grads(fn, q, k, v, d_out, kwargs)
  ref = functools.partial(dot_product_attention, impl="reference")
  ref_out, ref_lse, ref_grads = _value_and_grads(ref, q, k, v, d_out, kwargs)
  assert_close(out, ref_out, 1e-4, "out")
  assert_close(lse, ref_lse, 1e-4, "lse")
  for g, ref_g in zip(grads, ref_grads, strict=True):
    assert_close(g, ref_g, 2e-4, "grad")


def test_ring_with_batch_axis_on_2d_mesh():
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AUTO, AUTO))
  q, k, v, d_out = _inputs(4, 2, 32, 2, 2, 8, jnp.float32)
  _check("ring", q, k, v, d_out, mesh=mesh, options={"batch_axes": "data"}, mask=masks.causal())


def test_explicit_mesh_and_sharded_inputs():
  mesh = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4])  # explicit axes by default
  q, k, v, _ = _inputs(5, 1, 32, 4, 4, 8, jnp.float32)
  ref = dot_product_attention(q, k, v, mask=masks.causal(), impl="reference")
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq"))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
  sharded = sequence_parallel(dot_product_attention, mesh, strategy="allgather")
  out = sharded(q, k, v, mask=masks.causal(), impl="reference")
  assert out.sharding.spec[1] == "seq"
  assert_close(out, ref, 1e-5, "out")


def test_partial_op_and_variant_for_ulysses():
  q, k, v, _ = _inputs(6, 1, 32, 4, 2, 8, jnp.float32)
  ref = dot_product_attention(q, k, v, mask=masks.causal(), impl="reference")
  causal = functools.partial(dot_product_attention, mask=masks.causal(), impl="reference")
  out = sequence_parallel(causal, seq_mesh(), strategy="allgather")(q, k, v)
  assert_close(out, ref, 1e-5, "partial")
  out = sequence_parallel("softmax", seq_mesh(), strategy="ulysses")(q, k, v, impl="reference")
  assert_close(out, ref, 1e-5, "variant")
  with pytest.raises(ValueError, match="got 'softplus'"):
    sequence_parallel("softplus", seq_mesh(), strategy="ring")


@pytest.mark.parametrize(
  "strategy, preset, options, mask",
  [
    ("ring", "softmax", {}, masks.causal()),
    ("ring", "sliding_window", {"window": 5}, masks.sliding_window(4)),
    ("allgather", "chunked", {"chunk_size": 12}, masks.causal() & masks.chunked(12)),
    ("ring", "prefix_lm", {"prefix_len": 11}, masks.prefix_lm(11)),
  ],
  ids=["ring-softmax", "ring-sliding_window", "allgather-chunked", "ring-prefix_lm"],
)
def test_mask_presets_run_under_every_strategy_with_their_options(strategy, preset, options, mask):
  q, k, v, _ = _inputs(9, 1, 32, 4, 2, 8, jnp.float32)
  ref = dot_product_attention(q, k, v, mask=mask, impl="reference")
  by_name = sequence_parallel(preset, seq_mesh(), strategy=strategy)
  assert_close(by_name(q, k, v, impl="reference", **options), ref, 1e-5, "by name")
  preset_op = registry.get(preset).op
  bound = sequence_parallel(functools.partial(preset_op, **options), seq_mesh(), strategy=strategy)
  assert_close(bound(q, k, v, impl="reference"), ref, 1e-5, "partial of the preset op")
  with pytest.raises(TypeError, match="takes no mask= argument"):
    by_name(q, k, v, mask=masks.causal())


@pytest.mark.parametrize(
  "strategy, seq, match",
  [("ring", 36, "2 x 4 zigzag chunks"), ("allgather", 30, "4 devices"), ("ulysses", 30, "4")],
)
def test_uneven_length_raises(strategy, seq, match):
  q, k, v, _ = _inputs(7, 1, seq, 4, 4, 8, jnp.float32)
  sharded = sequence_parallel(dot_product_attention, seq_mesh(), strategy=strategy)
  with pytest.raises(ValueError, match=f"seq_len={seq}.*|{match}"):
    sharded(q, k, v)


def test_ulysses_heads_not_divisible_raises():
  q, k, v, _ = _inputs(8, 1, 32, 6, 6, 8, jnp.float32)
  sharded = sequence_parallel(dot_product_attention, seq_mesh(), strategy="ulysses")
  with pytest.raises(ValueError, match="heads divisible by the 'seq' axis size 4"):
    sharded(q, k, v)


def test_unknown_strategy_and_axis_raise():
  with pytest.raises(ValueError, match="not a softmax strategy"):
    sequence_parallel(dot_product_attention, seq_mesh(), strategy="zeco")
  with pytest.raises(ValueError, match="no axis 'tokens'"):
    sequence_parallel(dot_product_attention, seq_mesh(), axis="tokens")


@pytest.mark.parametrize("parts", [4, 8])
def test_zigzag_balances_causal_work(parts):
  zigzag = ring.visited_tiles(masks.causal(), 8192, parts, zigzag=True, block=128)
  contiguous = ring.visited_tiles(masks.causal(), 8192, parts, zigzag=False, block=128)
  assert zigzag.max() / zigzag.min() <= 1.1, zigzag
  assert contiguous.max() / contiguous.min() > 2, contiguous  # what zigzag fixes
  assert zigzag.sum() == contiguous.sum()  # same tiles, redistributed


def test_ring_runs_the_pallas_kernel_per_shard():
  q, k, v, _ = _inputs(11, 1, 256, 2, 1, 64, jnp.float32)
  sharded = sequence_parallel(dot_product_attention, seq_mesh(2), strategy="ring")
  out = sharded(q, k, v, mask=masks.causal(), impl="pallas_interpret")
  ref = dot_product_attention(q, k, v, mask=masks.causal(), impl="reference")
  assert_close(out, ref, 1e-4, "out")


@settings(max_examples=3, deadline=None)
@given(
  parts=st.sampled_from([2, 4]),
  chunk=st.integers(1, 5),
  kv_heads=st.sampled_from([1, 2]),
  groups=st.sampled_from([1, 2]),
  head_dim=st.sampled_from([4, 60]),
  window=st.integers(0, 12),
)
def test_allgather_and_ulysses_on_drawn_shapes(parts, chunk, kv_heads, groups, head_dim, window):
  heads = parts * kv_heads * groups  # ulysses: heads % parts == 0; kv heads may not divide
  seq = parts * (2 * chunk + 1)  # odd shard lengths
  q, k, v, _ = _inputs(chunk, 1, seq, heads, kv_heads, head_dim, jnp.float32)
  mask = masks.sliding_window(window)
  ref = dot_product_attention(q, k, v, mask=mask, impl="reference")
  for strategy in ("allgather", "ulysses"):
    sharded = sequence_parallel(dot_product_attention, seq_mesh(parts), strategy=strategy)
    assert_close(sharded(q, k, v, mask=mask, impl="xla"), ref, 1e-4, strategy)
