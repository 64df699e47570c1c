"""`attnjax.nn.Attention` against a hand-written composition of projections + the op."""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from attnjax import masks, nn
from attnjax.nn.norm import rms_normalize
from attnjax.ops import dot_product_attention
from tests.helpers import TOL_BLOCKED_F32, TOL_EXACT_F32, assert_close, random_normal


def _by_hand(attn: nn.Attention, x, *, mask, qk_norm=False, segment_ids=None):
  q = jnp.einsum("btd,dhk->bthk", x, attn.q[...])
  k = jnp.einsum("btd,dhk->bthk", x, attn.k[...])
  v = jnp.einsum("btd,dhk->bthk", x, attn.v[...])
  if qk_norm:
    q = rms_normalize(q) * attn.q_norm.scale[...]
    k = rms_normalize(k) * attn.k_norm.scale[...]
  positions = jnp.arange(x.shape[1])
  q, k = nn.apply_rope(q, positions), nn.apply_rope(k, positions)
  out = dot_product_attention(q, k, v, mask=mask, segment_ids=segment_ids, impl="reference")
  return jnp.einsum("bthk,hkd->btd", out, attn.out[...])


@functools.partial(nnx.jit, static_argnames=("mask", "qk_norm"))
def _module_and_by_hand(attn: nn.Attention, x, *, mask, qk_norm=False):
  """Both sides in one compiled program (eager op-by-op dispatch is far slower on CPU)."""
  return attn(x), _by_hand(attn, x, mask=mask, qk_norm=qk_norm)


def _randomize_norms(attn: nn.Attention, key):
  for i, norm in enumerate((attn.q_norm, attn.k_norm)):
    norm.scale[...] = 1 + random_normal(jax.random.fold_in(key, i), norm.scale.shape)


@pytest.mark.parametrize(
  "variant,options,mask,kv_heads,qk_norm",
  [
    ("softmax", {}, masks.causal(), 4, False),
    ("sliding_window", {"window": 3}, masks.sliding_window(2), 2, True),
    ("chunked", {"chunk_size": 4}, masks.causal() & masks.chunked(4), 1, False),
    ("prefix_lm", {"prefix_len": 5}, masks.prefix_lm(5), 2, False),
  ],
  ids=["softmax-mha", "sliding_window-gqa-qknorm", "chunked-mqa", "prefix_lm-gqa"],
)
def test_equals_composition(variant, options, mask, kv_heads, qk_norm):
  key = jax.random.key(1)
  attn = nn.Attention(
    24, num_heads=4, num_kv_heads=kv_heads, head_dim=10, variant=variant, qk_norm=qk_norm,
    impl="reference", rngs=nnx.Rngs(0), **options,
  )  # fmt: skip
  if qk_norm:
    _randomize_norms(attn, key)
  x = random_normal(jax.random.fold_in(key, 7), (2, 13, 24))
  assert attn.k.shape == (24, kv_heads, 10)
  out, by_hand = _module_and_by_hand(attn, x, mask=mask, qk_norm=qk_norm)
  assert_close(out, by_hand, TOL_EXACT_F32, variant)


@hypothesis.settings(max_examples=5)
@hypothesis.given(
  seq=st.integers(1, 23),
  kv_heads=st.sampled_from([1, 2, 3]),
  groups=st.sampled_from([1, 2]),
  head_dim=st.sampled_from([2, 6, 60]),
  embed=st.sampled_from([8, 20]),
)
def test_equals_composition_for_any_shape(seq, kv_heads, groups, head_dim, embed):
  attn = nn.Attention(
    embed, num_heads=kv_heads * groups, num_kv_heads=kv_heads, head_dim=head_dim,
    impl="reference", rngs=nnx.Rngs(seq),
  )  # fmt: skip
  x = random_normal(jax.random.key(seq), (1, seq, embed))
  assert_close(*_module_and_by_hand(attn, x, mask=masks.causal()), TOL_EXACT_F32, "shapes")


def test_xla_matches_reference_values_and_gradients():
  kwargs = dict(num_heads=6, num_kv_heads=2, head_dim=60)
  fast = nn.Attention(36, impl="xla", rngs=nnx.Rngs(3), **kwargs)
  ref = nn.Attention(36, impl="reference", rngs=nnx.Rngs(3), **kwargs)
  x = random_normal(jax.random.key(4), (2, 19, 36))

  def loss(module, x):
    return jnp.sum(jnp.sin(module(x)))

  assert_close(fast(x), ref(x), TOL_BLOCKED_F32, "values")
  grad_fn = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
  grads_fast, grads_ref = grad_fn(fast, x), grad_fn(ref, x)
  for g_fast, g_ref in zip(jax.tree.leaves(grads_fast), jax.tree.leaves(grads_ref), strict=True):
    assert_close(g_fast, g_ref, 2 * TOL_BLOCKED_F32, "gradients")


def test_rope_scores_invariant_to_a_shift_of_all_positions():
  q = random_normal(jax.random.key(0), (1, 9, 2, 16))
  k = random_normal(jax.random.key(1), (1, 9, 2, 16))
  positions = jnp.arange(9) * 3

  def scores(shift):
    qr = nn.apply_rope(q, positions + shift)
    kr = nn.apply_rope(k, positions + shift)
    return jnp.einsum("bqhd,bkhd->bhqk", qr, kr)

  assert_close(scores(517), scores(0), TOL_BLOCKED_F32, "shifted scores")
  # The rotation is position-dependent: unrotated scores differ.
  assert np.abs(scores(0) - jnp.einsum("bqhd,bkhd->bhqk", q, k)).max() > 1e-2


def test_rope_preserves_norms_and_needs_even_head_dim():
  x = random_normal(jax.random.key(0), (2, 5, 3, 8))
  norms = jnp.linalg.norm(nn.apply_rope(x, jnp.arange(5) + 100), axis=-1)
  assert_close(norms, jnp.linalg.norm(x, axis=-1), TOL_EXACT_F32, "norms")
  with pytest.raises(ValueError, match="even head_dim"):
    nn.apply_rope(random_normal(jax.random.key(0), (1, 4, 1, 7)), jnp.arange(4))


def test_qk_norm_makes_output_invariant_to_projection_scale():
  attn = nn.Attention(16, num_heads=2, qk_norm=True, impl="reference", rngs=nnx.Rngs(0))
  x = random_normal(jax.random.key(2), (1, 7, 16))
  before = attn(x)
  attn.q[...] = attn.q[...] * 9.0
  attn.k[...] = attn.k[...] * 0.2
  assert_close(attn(x), before, TOL_BLOCKED_F32, "qk-norm invariance")
  plain = nn.Attention(16, num_heads=2, qk_norm=False, impl="reference", rngs=nnx.Rngs(0))
  plain.q[...] = plain.q[...] * 9.0
  assert np.abs(plain(x) - before).max() > 1e-3


def test_packed_documents_match_separate_runs():
  attn = nn.Attention(16, num_heads=2, impl="reference", rngs=nnx.Rngs(0))
  x = random_normal(jax.random.key(5), (1, 11, 16))
  segment_ids = jnp.array([[1] * 4 + [2] * 7])
  packed = attn(x, segment_ids=segment_ids)
  assert_close(packed[:, :4], attn(x[:, :4]), TOL_EXACT_F32, "first document")
  assert_close(packed[:, 4:], attn(x[:, 4:]), TOL_EXACT_F32, "second document")


def test_parameters_carry_logical_axis_names():
  attn = nnx.eval_shape(
    lambda: nn.Attention(16, num_heads=4, num_kv_heads=2, qk_norm=True, rngs=nnx.Rngs(0))
  )
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(attn)))
  assert tuple(specs["q"]) == ("embed", "heads", "head_dim")
  assert tuple(specs["k"]) == ("embed", "kv_heads", "head_dim")
  assert tuple(specs["out"]) == ("heads", "head_dim", "embed")
  assert tuple(specs["q_norm"]["scale"]) == ("head_dim",)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_heads=2, head_dim=7), "even head_dim"),
    (dict(num_heads=2, variant="no_such_variant"), "unknown attention variant"),
  ],
)
def test_bad_construction_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nn.Attention(16, rngs=nnx.Rngs(0), **kwargs)


def test_bad_input_shape_is_a_clear_error():
  attn = nn.Attention(16, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"x must be \[batch, seq, embed=16\], got shape \(2, 5, 8\)"
  ):
    attn(jnp.ones((2, 5, 8)))
