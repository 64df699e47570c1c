"""Masks against brute-force predicates, and BlockMask invariants."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnjax import masks


def _doc(pos, starts=(0, 5, 6, 15, 22, 34)):
  return max(i for i, start in enumerate(starts) if start <= pos)


# (constructor, brute-force predicate on absolute positions q, k)
BRUTE_FORCE = {
  "full": (lambda: masks.full(), lambda q, k: True),
  "causal": (lambda: masks.causal(), lambda q, k: k <= q),
  "window_3_0": (lambda: masks.sliding_window(3), lambda q, k: q - 3 <= k <= q),
  "window_2_5": (lambda: masks.sliding_window(2, 5), lambda q, k: q - 2 <= k <= q + 5),
  "chunked_5": (lambda: masks.chunked(5), lambda q, k: q // 5 == k // 5),
  "prefix_lm_6": (lambda: masks.prefix_lm(6), lambda q, k: k < 6 or k <= q),
  "sinks_2": (lambda: masks.sinks(2), lambda q, k: k < 2),
  "strided_3": (lambda: masks.strided(3), lambda q, k: (q - k) % 3 == 0),
  "power_2": (lambda: masks.power(), lambda q, k: q == k or (q > k and (q - k) & (q - k - 1) == 0)),
  "power_3": (
    lambda: masks.power(3),
    lambda q, k: q - k in {0} | {3**i for i in range(8)},
  ),
  "causal_and_chunked": (
    lambda: masks.causal() & masks.chunked(4),
    lambda q, k: k <= q and q // 4 == k // 4,
  ),
  "sinks_or_window": (
    lambda: masks.sinks(1) | masks.sliding_window(2),
    lambda q, k: k < 1 or q - 2 <= k <= q,
  ),
  "not_causal": (lambda: ~masks.causal(), lambda q, k: k > q),
  "causal_and_strided_or_window": (
    lambda: masks.causal() & (masks.strided(4) | masks.sliding_window(1)),
    lambda q, k: k <= q and ((q - k) % 4 == 0 or q - k <= 1),
  ),
  "documents": (
    lambda: masks.documents([5, 1, 9, 7, 12]),
    lambda q, k: q < 34 and k < 34 and _doc(q) == _doc(k),
  ),
  "causal_documents": (
    lambda: masks.causal() & masks.documents([3, 20, 2]),
    lambda q, k: k <= q < 25 and _doc(q, [0, 3, 23, 25]) == _doc(k, [0, 3, 23, 25]),
  ),
  "xor_like": (
    lambda: (masks.causal() | masks.chunked(3)) & ~(masks.causal() & masks.chunked(3)),
    lambda q, k: (k <= q) != (q // 3 == k // 3),
  ),
}


def brute_force(pred, q_len, kv_len, q_offset):
  return np.array(
    [[bool(pred(i + q_offset, j)) for j in range(kv_len)] for i in range(q_len)], dtype=bool
  )


lengths = st.integers(1, 40)
blocks = st.sampled_from([1, 3, 4, 8, 16, 64])


@pytest.mark.parametrize("name", sorted(BRUTE_FORCE))
@given(q_len=lengths, kv_len=lengths, q_offset=st.integers(0, 9), bq=blocks, bkv=blocks)
def test_mask_matches_brute_force_and_block_mask_is_exact(name, q_len, kv_len, q_offset, bq, bkv):
  make, pred = BRUTE_FORCE[name]
  mask = make()
  expected = brute_force(pred, q_len, kv_len, q_offset)
  np.testing.assert_array_equal(masks.to_dense(mask, q_len, kv_len, q_offset=q_offset), expected)
  bm = masks.block_mask(mask, q_len, kv_len, bq, bkv, q_offset=q_offset)
  check_block_mask_invariants(bm, expected[None])


def check_block_mask_invariants(bm: masks.BlockMask, dense: np.ndarray) -> None:
  """Every True lies in a listed tile; listed tiles are never all False; FULL tiles are full."""
  heads, q_len, kv_len = dense.shape
  bq, bkv = bm.block_q, bm.block_kv
  padded = np.zeros((heads, bm.num_q_blocks * bq, bm.num_kv_blocks * bkv), bool)
  padded[:, :q_len, :kv_len] = dense
  tiles = padded.reshape(heads, bm.num_q_blocks, bq, bm.num_kv_blocks, bkv).swapaxes(2, 3)
  kinds = bm.tile_kinds()
  assert not tiles[kinds == masks.EMPTY].any(), "a True entry lies in an unlisted tile"
  assert tiles[kinds != masks.EMPTY].any(axis=(-1, -2)).all(), "a listed tile is all False"
  assert tiles[kinds == masks.FULL].all(), "a FULL tile has a False entry"
  np.testing.assert_array_equal(bm.to_dense(), dense)
  np.testing.assert_array_equal(bm.transpose().to_dense(), dense.transpose(0, 2, 1))
  counts = (kinds != masks.EMPTY).sum(-1)
  np.testing.assert_array_equal(bm.kv_counts, counts)
  # Partial tiles are stored once each.
  flat = bm.partial_tiles.reshape(len(bm.partial_tiles), -1)
  assert len(np.unique(flat, axis=0)) == len(flat)


@given(
  q_len=lengths,
  kv_len=lengths,
  bq=blocks,
  bkv=blocks,
  seed=st.integers(0, 2**16),
  heads=st.integers(1, 3),
)
def test_from_array_and_per_head(q_len, kv_len, bq, bkv, seed, heads):
  rng = np.random.default_rng(seed)
  array = rng.random((heads, q_len, kv_len)) < 0.3
  mask = masks.from_array(array)
  np.testing.assert_array_equal(masks.to_dense(mask, q_len, kv_len), array)
  check_block_mask_invariants(masks.block_mask(mask, q_len, kv_len, bq, bkv), array)
  per_head = masks.per_head([masks.causal(), masks.sliding_window(2), masks.strided(3)][:heads])
  dense = masks.to_dense(per_head, q_len, kv_len)
  preds = [BRUTE_FORCE[n][1] for n in ("causal", "window_3_0", "strided_3")]
  preds[1] = lambda q, k: q - 2 <= k <= q
  for h in range(heads):
    np.testing.assert_array_equal(dense[h], brute_force(preds[h], q_len, kv_len, 0))
  check_block_mask_invariants(masks.block_mask(per_head, q_len, kv_len, bq, bkv), dense)


@given(
  q_len=lengths, kv_len=lengths, bq=blocks, bkv=blocks, pq=st.integers(1, 9), pk=st.integers(1, 9)
)
def test_block_pattern(q_len, kv_len, bq, bkv, pq, pk):
  rng = np.random.default_rng(q_len * 97 + kv_len)
  bits = rng.random((-(-q_len // pq), -(-kv_len // pk))) < 0.4
  mask = masks.block_pattern(bits, pq, pk)
  expected = brute_force(lambda q, k: bits[q // pq, k // pk], q_len, kv_len, 0)
  np.testing.assert_array_equal(masks.to_dense(mask, q_len, kv_len), expected)
  check_block_mask_invariants(masks.block_mask(mask, q_len, kv_len, bq, bkv), expected[None])


def test_block_mask_skips_empty_tiles_and_dedupes():
  bm = masks.block_mask(masks.causal(), 1024, 1024, 128, 128)
  assert bm.kv_counts.tolist() == [list(range(1, 9))]
  assert bm.partial_tiles.shape == (1, 128, 128)
  assert bm.density == pytest.approx(36 / 64)


@pytest.mark.parametrize(
  "mask", [masks.causal(), masks.sliding_window(4095)], ids=["causal", "window"]
)
def test_block_mask_for_a_million_tokens_is_analytic(mask):
  start = time.perf_counter()
  bm = masks.block_mask(mask, 1 << 20, 1 << 20, 512, 512)
  elapsed = time.perf_counter() - start
  assert bm.num_q_blocks == 2048
  assert bm.partial_tiles.shape[0] <= 2  # diagonal tiles deduplicated
  assert elapsed < 30, f"took {elapsed:.1f}s: the dense matrix must not be built"


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: masks.sliding_window(-1), "left"),
    (lambda: masks.chunked(0), "size"),
    (lambda: masks.strided(0), "stride"),
    (lambda: masks.from_array(np.zeros((3,), bool)), "boolean array"),
    (lambda: masks.from_array(np.zeros((3, 3), int)), "boolean array"),
    (lambda: masks.per_head([]), "per_head"),
    (
      lambda: (
        masks.from_array(np.ones((2, 3, 3), bool)) & masks.from_array(np.ones((3, 3, 3), bool))
      ),
      "different head counts",
    ),
    (lambda: masks.block_mask(masks.causal(), 0, 4, 2, 2), "q_len"),
    (lambda: masks.block_mask(masks.causal(), 4, 4, 0, 2), "block_q"),
  ],
)
def test_bad_arguments_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize(
  "build, name",
  [
    (lambda x: masks.from_array(x > 0), "mask"),
    (lambda x: masks.block_pattern(x > 0, 2, 2), "bits"),
    (lambda x: masks.sliding_window(x.shape[0] + jnp.int32(x[0, 0] > 0)), "left"),
    (lambda x: masks.chunked(jnp.sum(x > 0).astype(jnp.int32)), "size"),
    (lambda x: masks.documents([jnp.int32(2), jnp.sum(x > 0)]), "lengths"),
  ],
  ids=["from_array", "block_pattern", "sliding_window", "chunked", "documents"],
)
def test_a_mask_built_from_a_traced_value_says_to_build_it_outside_jit(build, name):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)))
  with pytest.raises(ValueError, match=f"{name} is a traced value .*outside `jax.jit`"):
    jax.jit(build)(x)
  assert isinstance(build(x), masks.Mask)  # the same call on concrete values builds


@pytest.mark.parametrize(
  "mask",
  [masks.causal(), masks.sliding_window(3), masks.causal() & masks.chunked(4), masks.prefix_lm(3)],
  ids=["causal", "window", "chunked", "prefix_lm"],
)
def test_on_arrays_evaluates_traced_positions_as_numpy_does(mask):
  kv_pos = np.arange(12)
  at = jax.jit(lambda start: mask.on_arrays((start + np.arange(4))[:, None], kv_pos[None]))
  for start in (0, 5, 8):
    want = mask((start + np.arange(4))[:, None], kv_pos[None])
    np.testing.assert_array_equal(at(start), want)
