"""Both block-sparse kernels, interpreted, against the float32 reference: outputs, lse and
gradients over masks, GQA/MQA, segments, softcap, sinks, bfloat16, decoding offsets and rows
with nothing to attend to.

The kernels run behind the op's adapter (`attnjax.ops.softmax.pallas.attention`), which has the
reference's signature and builds the `MaskInfo` the kernel walks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import BlockSizes, pallas, reference
from kernels_pallas import block_sparse
from tests.helpers import assert_matches_reference, random_normal, tolerance

KERNELS = ("tpu", "gpu")

MASKS = {
  "none": None,
  "causal": masks.causal(),
  "window_bidir": masks.sliding_window(3, 4),
  "sparse_transformer": masks.causal() & (masks.strided(4) | masks.sliding_window(3)),
  "power": masks.power(),
  "random_array": masks.from_array(np.random.default_rng(0).random((37, 37)) < 0.4),
  "per_head": masks.per_head(
    [masks.causal(), masks.sliding_window(3), masks.strided(2), masks.full()]
  ),
}

# mask -> (heads, kv_heads, dtype, segments, softcap, sinks)
CASES = {
  "causal": (4, 2, jnp.float32, False, None, True),
  "none": (4, 1, jnp.float32, True, 4.0, False),
  "power": (4, 4, jnp.bfloat16, True, None, True),
  "random_array": (4, 2, jnp.float32, False, None, True),
  "sparse_transformer": (4, 1, jnp.float32, True, 4.0, False),
  "window_bidir": (4, 4, jnp.bfloat16, True, None, True),
  "per_head": (4, 2, jnp.float32, False, 4.0, True),
}


def make_inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = random_normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = random_normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
  v = random_normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
  return q, k, v, jax.random.normal(keys[3], (heads,))


def random_segments(seed, batch, length, padding_id=None):
  ids = np.sort(np.random.default_rng(seed).integers(0, 4, size=(batch, length)), axis=1)
  if padding_id is not None:
    ids[:, -3:] = padding_id
  return jnp.asarray(ids, jnp.int32)


def kernel_and_reference(kernel, q, k, v, **options):
  """`(q, k, v, sinks=...) -> (out, lse)` by the interpreted `kernel` and by the reference."""
  options = dict(mask=None, segment_ids=None, softcap=None, q_offset=0, scale=0.125) | options
  block_sizes = options.pop("block_sizes", None)
  shape = check_qkv(q, k, v)
  run = functools.partial(pallas.attention, shape=shape, **options)
  return (
    jax.jit(functools.partial(run, block_sizes=block_sizes, interpret=True, kernel=kernel)),
    jax.jit(functools.partial(reference.attention, shape=shape, **options)),
  )


def check(kernel, q, k, v, sinks, what, **options):
  fn, ref = kernel_and_reference(kernel, q, k, v, **options)
  out, lse = jax.eval_shape(fn, q, k, v, sinks=sinks)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  assert_matches_reference(fn, ref, (q, k, v), dict(sinks=sinks), tolerance(q.dtype), what)


@pytest.mark.parametrize("mask_name", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference(kernel, mask_name):
  heads, kv_heads, dtype, segments, softcap, sinks = CASES[mask_name]
  q, k, v, sink_logits = make_inputs(1, 1, 37, 37, heads, kv_heads, 60, dtype)
  segment_ids = masks.SegmentIds(random_segments(2, 1, 37)) if segments else None
  check(
    kernel, q, k, v, sink_logits if sinks else None, f"{kernel} {mask_name}",
    mask=MASKS[mask_name], segment_ids=segment_ids, softcap=softcap,
    block_sizes=BlockSizes(16, 8),
  )  # fmt: skip


@pytest.mark.parametrize("kernel", KERNELS)
def test_decoding_and_cross_attention_with_q_offset(kernel):
  q, k, v, sinks = make_inputs(3, 2, 5, 41, 6, 2, 64, jnp.float32)
  for mask in (masks.causal(), masks.sliding_window(7)):
    check(kernel, q, k, v, None, f"{kernel} q_offset", mask=mask, q_offset=36)
  segment_ids = masks.SegmentIds(random_segments(4, 2, 5), random_segments(5, 2, 41))
  check(kernel, q, k, v, sinks, f"{kernel} cross segments", segment_ids=segment_ids)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(kernel):
  q, k, v, sinks = make_inputs(5, 2, 19, 19, 4, 2, 60, jnp.float32)
  d_out = random_normal(jax.random.PRNGKey(6), q.shape)
  array = np.random.default_rng(0).random((19, 19)) < 0.5
  array[[0, 7, 18]] = False
  segment_ids = masks.SegmentIds(random_segments(6, 2, 19, padding_id=9), padding_id=9)
  for options, dead in (
    (dict(mask=masks.from_array(array)), ~array.any(-1)),
    (dict(mask=masks.from_array(array), sinks=sinks), ~array.any(-1)),
    (dict(segment_ids=segment_ids, mask=masks.causal()), np.arange(19) >= 16),
  ):
    sink_logits = options.pop("sinks", None)
    fn, _ = kernel_and_reference(kernel, q, k, v, block_sizes=BlockSizes(8, 8), **options)

    def loss(q, k, v, fn=fn, sink_logits=sink_logits):
      out, lse = fn(q, k, v, sinks=sink_logits)
      return (out * d_out).sum(), (out, lse)

    grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_array_equal(np.asarray(out)[:, dead], 0.0)
    if sink_logits is None:  # a sink keeps the denominator positive
      assert np.isneginf(np.asarray(lse)[:, dead]).all()
    for g in grads:
      assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_mask_info_must_fit_the_lengths(kernel):
  info = pallas.mask_info(masks.causal(), 64, 64, 32, 32, 0)
  q = jnp.ones((1, 20, 2, 64))
  with pytest.raises(ValueError, match="does not fit"):
    getattr(block_sparse, kernel).block_sparse_attention(q, q, q, info, scale=1.0, interpret=True)
