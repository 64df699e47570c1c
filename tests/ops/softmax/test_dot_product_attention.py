"""`dot_product_attention`: every implementation against the float32 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax as aj
from attnjax import masks
from attnjax.ops.softmax import BlockSizes
from tests.helpers import assert_close, assert_matches_reference, random_normal, tolerance

FAST_IMPLS = ["xla", "pallas_interpret"]

MASKS = {
  "none": lambda q_len, kv_len: None,
  "causal": lambda q_len, kv_len: masks.causal(),
  "window": lambda q_len, kv_len: masks.sliding_window(6),
  "window_bidir": lambda q_len, kv_len: masks.sliding_window(3, 4),
  "chunked_causal": lambda q_len, kv_len: masks.causal() & masks.chunked(9),
  "prefix_lm": lambda q_len, kv_len: masks.prefix_lm(11),
  "sparse_transformer": lambda q_len, kv_len: (
    masks.causal() & (masks.strided(4) | masks.sliding_window(3))
  ),
  "sinks_window": lambda q_len, kv_len: masks.sinks(2) | masks.sliding_window(4),
  "power": lambda q_len, kv_len: masks.power(),
  "random_array": lambda q_len, kv_len: masks.from_array(
    np.random.default_rng(q_len * 1000 + kv_len).random((q_len, kv_len)) < 0.4
  ),
  "per_head": lambda q_len, kv_len: masks.per_head(
    [masks.causal(), masks.sliding_window(3), masks.strided(2), masks.full()]
  ),
}

# (heads, kv_heads, dtype, segments, softcap, sinks)
CONFIGS = {
  "gqa2_f32_sinks": (4, 2, jnp.float32, False, None, True),
  "mqa_f32_segments_softcap": (4, 1, jnp.float32, True, 4.0, False),
  "mha_bf16_segments_sinks": (4, 4, jnp.bfloat16, True, None, True),
}


def make_inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = random_normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = random_normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
  v = random_normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
  sinks = jax.random.normal(keys[3], (heads,))
  d_out = random_normal(keys[4], (batch, q_len, heads, head_dim), jnp.float32)
  return q, k, v, sinks, d_out


def random_segments(seed, batch, length, padding_id=None):
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(0, 4, size=(batch, length)), axis=1)
  if padding_id is not None:
    ids[:, -3:] = padding_id
  return jnp.asarray(ids, jnp.int32)


def _attention(impl, use_sinks, **kwargs):
  """`(out, lse)` of `impl`, the lse of fully masked rows (-inf) replaced by 0 to differentiate."""

  def attention(q, k, v, sinks):
    out, lse = aj.ops.dot_product_attention(
      q, k, v, sinks=sinks if use_sinks else None, impl=impl, return_lse=True, **kwargs
    )
    return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

  return attention


def compare(impl, q, k, v, sinks, *, use_sinks, **kwargs):
  """Output, lse and gradients (of q, k, v and the sinks) of `impl` vs the reference."""
  out, lse = aj.ops.dot_product_attention(
    q, k, v, sinks=sinks if use_sinks else None, impl=impl, return_lse=True, **kwargs
  )
  ref_lse = aj.ops.dot_product_attention(
    q, k, v, sinks=sinks if use_sinks else None, impl="reference", return_lse=True, **kwargs
  )[1]
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  assert_matches_reference(
    _attention(impl, use_sinks, **kwargs),
    _attention("reference", use_sinks, **kwargs),
    (q, k, v, sinks),
    {},
    tolerance(q.dtype),
    impl,
  )


# Every mask with one feature configuration (rotating), to keep the suite's compile time small.
MASK_CONFIG_PAIRS = [
  (mask_name, sorted(CONFIGS)[i % len(CONFIGS)]) for i, mask_name in enumerate(sorted(MASKS))
]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mask_name, config", MASK_CONFIG_PAIRS)
def test_matches_reference(impl, mask_name, config):
  heads, kv_heads, dtype, segments, softcap, sinks = CONFIGS[config]
  batch, q_len, kv_len, head_dim = 2, 37, 37, 60
  q, k, v, sink_logits, _ = make_inputs(1, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
  compare(
    impl,
    q,
    k,
    v,
    sink_logits,
    mask=MASKS[mask_name](q_len, kv_len),
    segment_ids=random_segments(2, batch, q_len) if segments else None,
    softcap=softcap,
    use_sinks=sinks,
    block_sizes=BlockSizes(16, 8),
  )


@pytest.mark.parametrize("impl", FAST_IMPLS)
@settings(max_examples=8)
@given(
  q_len=st.integers(1, 70),
  kv_len=st.integers(1, 70),
  kv_heads=st.sampled_from([1, 2, 3]),
  groups=st.sampled_from([1, 2, 3]),
  head_dim=st.sampled_from([60, 64, 128]),
  block_q=st.sampled_from([8, 16, 32]),
  block_kv=st.sampled_from([8, 16, 64]),
  mask_name=st.sampled_from(sorted(set(MASKS) - {"per_head"})),
  seed=st.integers(0, 1000),
)
def test_matches_reference_on_drawn_shapes(
  impl, q_len, kv_len, kv_heads, groups, head_dim, block_q, block_kv, mask_name, seed
):
  heads = kv_heads * groups
  q, k, v, sinks, d_out = make_inputs(
    seed, 1, q_len, kv_len, heads, kv_heads, head_dim, jnp.float32
  )
  compare(
    impl,
    q,
    k,
    v,
    sinks,
    mask=MASKS[mask_name](q_len, kv_len),
    use_sinks=seed % 2 == 0,
    block_sizes=BlockSizes(block_q, block_kv),
  )


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_decoding_and_cross_attention_with_q_offset(impl):
  q, k, v, sinks, d_out = make_inputs(3, 2, 5, 41, 6, 2, 64, jnp.float32)
  for mask in (masks.causal(), masks.sliding_window(7)):
    compare(impl, q, k, v, sinks, mask=mask, q_offset=36, use_sinks=False)
  segment_ids = masks.SegmentIds(random_segments(4, 2, 5), random_segments(5, 2, 41))
  compare(impl, q, k, v, sinks, segment_ids=segment_ids, use_sinks=True)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_fully_masked_rows_give_zeros_and_finite_gradients(impl):
  q, k, v, sinks, d_out = make_inputs(5, 2, 19, 19, 4, 2, 60, jnp.float32)
  array = np.random.default_rng(0).random((19, 19)) < 0.5
  array[[0, 7, 18]] = False
  segment_ids = masks.SegmentIds(random_segments(6, 2, 19, padding_id=9), padding_id=9)
  for kwargs in (
    dict(mask=masks.from_array(array)),
    dict(segment_ids=segment_ids, mask=masks.causal()),
    dict(mask=masks.from_array(array), sinks=sinks),
  ):

    def loss(q, k, v, kwargs=kwargs):
      out = aj.ops.dot_product_attention(q, k, v, impl=impl, block_sizes=BlockSizes(8, 8), **kwargs)
      return (out * d_out).sum(), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    dead = ~array.any(-1) if "segment_ids" not in kwargs else None
    if dead is not None:
      np.testing.assert_array_equal(np.asarray(out)[:, dead], 0.0)
    else:
      np.testing.assert_array_equal(np.asarray(out)[:, -3:], 0.0)
    for g in grads:
      assert np.isfinite(np.asarray(g)).all()
  _, lse = aj.ops.dot_product_attention(
    q, k, v, mask=masks.from_array(array), impl=impl, return_lse=True
  )
  assert np.isneginf(np.asarray(lse)[:, 0]).all()


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize(
  "mask, jax_kwargs",
  [
    (None, {}),
    (masks.causal(), {"is_causal": True}),
    (masks.sliding_window(5), {"local_window_size": (5, 0)}),
    (masks.sliding_window(4, 3), {"local_window_size": (4, 3)}),
  ],
  ids=["full", "causal", "window", "window_bidir"],
)
def test_agrees_with_jax_nn_dot_product_attention(impl, mask, jax_kwargs):
  q, k, v, _, _ = make_inputs(7, 2, 45, 45, 6, 3, 64, jnp.float32)
  ours = aj.ops.dot_product_attention(q, k, v, mask=mask, impl=impl, block_sizes=BlockSizes(16, 16))
  theirs = jax.nn.dot_product_attention(q, k, v, implementation="xla", **jax_kwargs)
  assert_close(ours, theirs, 1e-5, "vs jax.nn.dot_product_attention")


def test_xla_jits_and_skips_empty_tiles():
  q, k, v, _, _ = make_inputs(8, 1, 64, 64, 2, 2, 32, jnp.float32)
  fn = jax.jit(
    functools.partial(
      aj.ops.dot_product_attention,
      mask=masks.sliding_window(7),
      impl="xla",
      block_sizes=BlockSizes(8, 8),
    )
  )
  ref = aj.ops.dot_product_attention(q, k, v, mask=masks.sliding_window(7), impl="reference")
  assert_close(fn(q, k, v), ref, 1e-4, "jit")
  from attnjax.ops.softmax import blockwise

  schedule = blockwise.cached_schedule(masks.sliding_window(7), 64, 64, 8, 8, 0)
  # 8 query blocks, each visiting 2 kv blocks: 16 tiles in all, never the 64 of a dense pass.
  assert schedule.steps * schedule.lanes == 16


def _bad(**overrides):
  args = dict(
    q=jnp.ones((2, 8, 4, 16)), k=jnp.ones((2, 8, 2, 16)), v=jnp.ones((2, 8, 2, 16)), impl="xla"
  )
  args.update(overrides)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return lambda: aj.ops.dot_product_attention(q, k, v, **args)


@pytest.mark.parametrize(
  "call, match",
  [
    (_bad(k=jnp.ones((2, 8, 3, 16)), v=jnp.ones((2, 8, 3, 16))), "multiple of k/v heads"),
    (_bad(k=jnp.ones((2, 8, 2, 8))), "head_dim=16"),
    (_bad(q=jnp.ones((2, 8, 16))), r"q must be \[batch, seq, heads, head_dim\]"),
    (_bad(v=jnp.ones((2, 7, 2, 16))), "v must be"),
    (_bad(mask=masks.from_array(np.ones((8, 9), bool))), r"mask array has shape \(8, 9\)"),
    (_bad(mask=np.ones((8, 8), bool)), "attnjax.masks.Mask"),
    (_bad(mask=masks.per_head([masks.causal()] * 3)), "per-head mask has 3 heads"),
    (_bad(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids .* \(2, 8\)"),
    (_bad(segment_ids=jnp.zeros((2, 8))), "must be integers"),
    (_bad(sinks=jnp.zeros((3,))), "sinks must have shape"),
    (_bad(softcap=-1.0), "softcap"),
    (_bad(impl="cuda"), "impl must be one of"),
    (_bad(impl="pallas"), "impl='pallas'"),
    (_bad(q_offset=-1, mask=masks.causal()), "q_offset"),
  ],
)
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
