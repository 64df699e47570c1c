"""`neighborhood_attention`: every fast implementation against the dense float32 reference."""

from __future__ import annotations

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from attnjax import ops, registry
from attnjax.ops.neighborhood import BlockSizes, neighborhood_attention
from tests.helpers import assert_close, assert_matches_reference, random_normal, tolerance

FAST_IMPLS = ("xla", "pallas_interpret")


def _inputs(seed, spatial, heads, kv_heads, head_dim, dtype=jnp.float32, batch=2):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = random_normal(keys[0], (batch, *spatial, heads, head_dim), dtype)
  k = random_normal(keys[1], (batch, *spatial, kv_heads, head_dim), dtype)
  v = random_normal(keys[2], (batch, *spatial, kv_heads, head_dim), dtype)
  d_out = random_normal(keys[3], q.shape, jnp.float32)
  return q, k, v, d_out


def check_against_reference(impl, spatial, heads=2, kv_heads=1, head_dim=12, dtype=jnp.float32,
                            seed=0, block_sizes=None, **options):  # fmt: skip
  """Outputs and gradients of `impl` vs the reference (which runs on float32 copies)."""
  q, k, v, _ = _inputs(seed, spatial, heads, kv_heads, head_dim, dtype)
  fast = functools.partial(neighborhood_attention, impl=impl, block_sizes=block_sizes, **options)
  out = jax.jit(fast)(q, k, v)
  assert out.dtype == dtype and out.shape == q.shape
  reference = functools.partial(neighborhood_attention, impl="reference", **options)
  assert_matches_reference(fast, reference, (q, k, v), {}, tolerance(dtype), impl)


CASES = {
  "1d_odd_dilated": dict(spatial=(37,), kernel_size=7, dilation=3),
  "1d_causal_gqa4": dict(spatial=(29,), kernel_size=9, causal=True, heads=4, kv_heads=1),
  "2d_odd_mixed_hd60": dict(spatial=(13, 11), kernel_size=(3, 5), dilation=(2, 1), head_dim=60),
  "2d_causal_axis": dict(spatial=(9, 10), kernel_size=5, causal=(False, True), heads=3, kv_heads=3),
  "3d": dict(spatial=(5, 6, 7), kernel_size=(3, 3, 5), dilation=(1, 2, 1), heads=2, kv_heads=2),
}


# The interpreter is slow to compile: it runs the cases that cover distinct kernel paths.
KERNEL_CASES = ("1d_causal_gqa4", "2d_odd_mixed_hd60", "3d")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_xla_matches_reference_float32(case):
  check_against_reference("xla", **CASES[case])


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_pallas_interpret_matches_reference_float32(case):
  check_against_reference("pallas_interpret", **CASES[case])


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_matches_reference_bfloat16(impl):
  check_against_reference(
    impl, (12, 13), kernel_size=5, dilation=(1, 2), causal=(True, False), dtype=jnp.bfloat16
  )


def test_uneven_block_sizes():
  check_against_reference("xla", (11, 14), kernel_size=3, block_sizes=BlockSizes((3, 8)))


# kernel_size=1 makes dq exactly zero (one key per softmax): see test_kernel_size_one_...
@hypothesis.settings(max_examples=3)
@hypothesis.given(
  spatial=st.lists(st.integers(3, 12), min_size=1, max_size=2).map(tuple),
  kernel_size=st.just(3),
  dilation=st.integers(1, 3),
  causal=st.booleans(),
  kv_heads=st.sampled_from([1, 2]),
)
def test_xla_matches_reference_on_random_shapes(spatial, kernel_size, dilation, causal, kv_heads):
  dilation = min(dilation, min(spatial) // kernel_size)
  check_against_reference(
    "xla",
    spatial,
    heads=2,
    kv_heads=kv_heads,
    kernel_size=kernel_size,
    dilation=dilation,
    causal=causal,
  )


def test_kernel_size_one_returns_the_values():
  q, k, v, _ = _inputs(3, (6, 5), 2, 2, 8)
  out = jax.jit(functools.partial(neighborhood_attention, kernel_size=1, impl="xla"))(q, k, v)
  np.testing.assert_allclose(out, v, rtol=1e-6)


def test_full_window_equals_global_attention():
  q, k, v, _ = _inputs(4, (5, 7), 2, 1, 8)
  out = jax.jit(functools.partial(neighborhood_attention, kernel_size=(5, 7), impl="xla"))(q, k, v)
  flat = [x.reshape(2, 35, *x.shape[-2:]) for x in (q, k, v)]
  dense = jax.jit(functools.partial(ops.dot_product_attention, impl="reference"))(*flat).reshape(
    out.shape
  )
  assert_close(out, dense, 1e-5, "full window")


def test_exported_from_ops_and_auto_runs_on_cpu():
  q, k, v, _ = _inputs(5, (16,), 2, 2, 8)
  auto = jax.jit(functools.partial(ops.neighborhood_attention, kernel_size=5))(q, k, v)
  ref = jax.jit(functools.partial(neighborhood_attention, kernel_size=5, impl="reference"))
  assert_close(auto, ref(q, k, v), 1e-4)


@pytest.mark.skipif(
  jax.default_backend() in ("tpu", "gpu"), reason="on TPU and GPU impl='pallas' is supported"
)
def test_pallas_is_unsupported_off_tpu_and_gpu():
  q, k, v, _ = _inputs(6, (16,), 2, 2, 8)
  with pytest.raises(registry.Unsupported, match="impl='pallas'"):
    neighborhood_attention(q, k, v, kernel_size=5, impl="pallas")


@pytest.mark.parametrize(
  "shapes, options, message",
  [
    (((2, 8, 2, 4), (2, 8, 2, 4)), dict(kernel_size=4), "odd"),
    (((2, 8, 2, 4), (2, 8, 2, 4)), dict(kernel_size=5, dilation=2), "kernel_size \\* dilation"),
    (((2, 8, 8, 2, 4), (2, 8, 8, 2, 4)), dict(kernel_size=(3, 3, 3)), "1 or 2 values"),
    (((2, 8, 8, 2, 4), (2, 8, 8, 2, 4)), dict(kernel_size=3.0), "int"),
    (((2, 8, 8, 2, 4), (2, 8, 8, 2, 4)), dict(kernel_size=3, causal=1), "bool"),
    (((2, 8, 7, 2, 4), (2, 8, 8, 2, 4)), dict(kernel_size=3), "spatial shape"),
    (((2, 8, 3, 4), (2, 8, 2, 4)), dict(kernel_size=3), "multiple"),
    (((2, 2, 2, 2, 8, 3, 4), (2, 2, 2, 2, 8, 3, 4)), dict(kernel_size=1), "1 to 3 spatial"),
    (((2, 8, 2, 4), (2, 8, 2, 4)), dict(kernel_size=3, impl="cuda"), "impl"),
  ],
)
def test_bad_arguments_raise(shapes, options, message):
  q_shape, kv_shape = shapes
  q, k = jnp.ones(q_shape), jnp.ones(kv_shape)
  with pytest.raises(ValueError, match=message):
    neighborhood_attention(q, k, k, **options)


def test_bad_block_sizes_raise():
  q = jnp.ones((1, 8, 8, 2, 4))
  with pytest.raises(ValueError, match="one size per spatial axis"):
    neighborhood_attention(q, q, q, kernel_size=3, impl="xla", block_sizes=BlockSizes((4,)))
  with pytest.raises(ValueError, match="positive"):
    BlockSizes((0, 4))
