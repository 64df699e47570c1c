"""The Mosaic TPU block-sparse kernel: TPU lowering, TPU-interpreter race and bounds checks,
visited tiles, TPU block-size rules."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax import masks
from attnjax.ops.softmax.pallas import mask_info
from kernels_pallas.block_sparse import BlockSizes, tpu
from kernels_pallas.block_sparse.common import PARTIAL
from kernels_pallas.block_sparse.tpu import block_sparse_attention, check_block_sizes
from tests.helpers import assert_close, random_normal

EXPORT_MASKS = {
  "causal": masks.causal(),
  "window": masks.sliding_window(200),
  "per_head": masks.per_head([masks.causal(), masks.sliding_window(100)] * 2),
}


def _export(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_name", sorted(EXPORT_MASKS))
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "segments_sinks_softcap"])
def test_lowers_for_tpu_forward_and_gradient(dtype, kv_heads, mask_name, extras):
  batch, seq, heads, head_dim = 1, 640, 4, 128
  info = mask_info(EXPORT_MASKS[mask_name], seq, seq, 128, 256, 0)
  q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  sinks = jax.ShapeDtypeStruct((heads,), jnp.float32)

  def attend(q, k, v, ids, sinks):
    kwargs = dict(segment_ids=(ids, ids), sinks=sinks, softcap=30.0) if extras else {}
    return block_sparse_attention(q, k, v, info, scale=0.125, **kwargs)

  def grads(q, k, v, ids, sinks):
    def loss(q, k, v, sinks):
      out, lse = attend(q, k, v, ids, sinks)
      return out.astype(jnp.float32).sum() + lse.sum()

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

  assert "tpu_custom_call" in _export(attend, q, kv, kv, ids, sinks).mlir_module()
  assert _export(grads, q, kv, kv, ids, sinks).mlir_module().count("tpu_custom_call") >= 3


def test_tpu_interpreter_finds_no_races_or_out_of_bounds_reads():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call

  batch, seq, heads, kv_heads, head_dim = 1, 300, 2, 1, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = random_normal(keys[0], (batch, seq, heads, head_dim))
  k = random_normal(keys[1], (batch, seq, kv_heads, head_dim))
  v = random_normal(keys[2], (batch, seq, kv_heads, head_dim))
  ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (batch, seq))), jnp.int32)
  mask = masks.causal() & masks.sliding_window(150)
  info = mask_info(mask, seq, seq, 128, 128, 0)
  params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")

  def loss(q, k, v, interpret):
    out, _ = block_sparse_attention(
      q, k, v, info, scale=0.1, segment_ids=(ids, ids), interpret=interpret
    )
    return (out * out).sum(), out

  (grads, out) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, params)
  assert interpret_pallas_call.races is not None
  assert not interpret_pallas_call.races.races_found
  ref_grads, ref_out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
  assert_close(out, ref_out, 1e-6, "InterpretParams vs interpret=True")
  for g, ref_g in zip(grads, ref_grads, strict=True):
    assert_close(g, ref_g, 1e-6, "gradients")


def test_sparse_mask_fetches_and_computes_only_live_tiles():
  """With a 12.5%-dense block pattern the forward grid touches exactly the live kv blocks."""
  seq, block = 2048, 128
  n = seq // block
  bits = np.random.default_rng(1).random((n, n)) < 0.125
  info = mask_info(masks.block_pattern(bits, block, block), seq, seq, block, block, 0)
  assert info.visited_tiles() == bits.sum()
  visited = []

  def record(token, grid_point, core_id):
    visited.append(tuple(int(c) for c in grid_point))
    return token

  q = random_normal(jax.random.PRNGKey(2), (1, seq, 1, 128))
  params = pltpu.InterpretParams(grid_point_recorder=record)
  block_sparse_attention(q, q, q, info, scale=0.1, interpret=params)[0].block_until_ready()
  # A kv tile is fetched when its block index changes along a row, computed when j < count.
  fetched, computed = set(), 0
  for _, _, row, step in visited:
    fetched.add((row, int(info.indices[0, row, step])))
    computed += step < info.counts[0, row]
  live = {(int(r), int(c)) for r, c in zip(*np.nonzero(bits), strict=True)}
  assert fetched == live | {(r, 0) for r in range(n) if not bits[r].any()}
  assert computed == len(live)
  assert len(visited) == n * info.indices.shape[-1] < n * n


def test_block_sizes_are_validated_for_tpu():
  with pytest.raises(ValueError, match="block_kv=96 must be a multiple of 128"):
    check_block_sizes(BlockSizes(128, 96), 256, 384)
  with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
    check_block_sizes(BlockSizes(64, 128), 128, 256)
  check_block_sizes(BlockSizes(40, 40), 40, 40)  # one block spanning the array is allowed
  with pytest.raises(ValueError, match="positive int"):
    BlockSizes(0, 128)
  info = mask_info(masks.causal(), 64, 64, 32, 32, 0)
  q = jnp.ones((1, 64, 2, 64))
  with pytest.raises(ValueError, match="multiple of 128"):
    block_sparse_attention(q, q, q, info, scale=1.0)


def _windows_per_head(heads: int, window: int):
  """Head i: causal sliding window of (i + 1) * window tokens."""
  return masks.per_head(
    [masks.causal() & masks.sliding_window(window * (i + 1)) for i in range(heads)]
  )


def test_step_tables_fit_smem_at_128k_tokens_with_per_head_windows():
  """8 heads, windows of 1k ... 8k tokens, 128-row tiles: the tables are split over calls whose
  tables each fit the SMEM budget."""
  seq = 131072
  info = mask_info(_windows_per_head(8, 1024), seq, seq, 128, 128, 0)
  smem = tpu.table_smem_bytes(info, heads=8, kv_heads=2)
  for calls in smem.values():
    assert len(calls) > 1
    assert max(calls) <= tpu.TABLE_SMEM_BYTES < tpu.SMEM_BYTES


def test_a_row_too_long_for_smem_is_a_value_error():
  info = mask_info(masks.causal(), 1024, 1024, 32, 128, 0)
  with (
    mock.patch.object(tpu, "TABLE_SMEM_BYTES", 64),
    pytest.raises(ValueError, match="bytes of SMEM"),
  ):
    tpu.table_smem_bytes(info, heads=1, kv_heads=1)


def test_mask_tile_ids_are_carried_over_non_partial_steps():
  """A step names the mask tile its block needs (PARTIAL) or the last one before it, so the
  tile's block index changes only at partial steps: no tile is fetched twice in a row."""
  info = mask_info(_windows_per_head(4, 200), 1024, 1024, 128, 128, 0)
  tables = [*tpu.forward_tables(info), *tpu.dkv_tables(info, heads=4, kv_heads=2)]
  for layout, table in tables:
    entries = np.asarray(table)
    kinds, tiles = entries & 3, entries >> (2 + layout.block_bits)
    changes = np.flatnonzero(np.diff(tiles)) + 1
    assert len(changes) and (kinds[changes] == PARTIAL).all()
  ((layout, table),) = tpu.forward_tables(info)
  entries = np.asarray(table)
  partial = (entries & 3) == PARTIAL
  np.testing.assert_array_equal(
    (entries >> (2 + layout.block_bits))[partial], info.partial_ids.reshape(-1)[partial]
  )


def test_interpreter_fetches_a_mask_tile_only_when_the_tile_changes():
  """Counted in the TPU interpreter: within a row a tile is fetched only where the step table
  names another tile; a row's first step may fetch once more (the interpreter visits the
  parallel grid dims in a random order)."""
  from benchmarks import dma_counts

  seq, block = 512, 128
  info = mask_info(masks.per_head([masks.causal(), masks.sliding_window(200, 200)]), seq, seq,
                   block, block, 0)  # fmt: skip
  ((layout, table),) = tpu.forward_tables(info)
  tiles = (np.asarray(table) >> (2 + layout.block_bits)).reshape(-1, layout.steps)
  changes_in_rows = np.count_nonzero(np.diff(tiles, axis=1))
  q = random_normal(jax.random.PRNGKey(3), (1, seq, 2, 128), jnp.bfloat16)
  params = pltpu.InterpretParams()
  counts = dma_counts.count(
    lambda q: block_sparse_attention(q, q[:, :, :1], q[:, :, :1], info, scale=0.1,
                                     interpret=params)[0], q
  )  # fmt: skip
  (call,) = counts.per_call
  fetches = call.hbm_to_vmem_by_operand["refs[3]"] // (block * block)  # int8 tiles
  assert changes_in_rows < fetches <= changes_in_rows + len(tiles)


def test_gqa_heads_share_one_kv_fetch_in_the_forward_and_dq_kernels():
  """4 query heads per kv head, 128-row tiles: the forward and dq q blocks hold the whole group,
  so K/V are read a quarter as often as with one head per block (counted in the TPU
  interpreter); values and gradients are the same."""
  from benchmarks import dma_counts

  seq, heads, block = 512, 4, 128
  info = mask_info(masks.causal(), seq, seq, block, block, 0)
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  q = random_normal(keys[0], (1, seq, heads, 128), jnp.bfloat16)
  k, v = (random_normal(key, (1, seq, 1, 128), jnp.bfloat16) for key in keys[1:])
  params = pltpu.InterpretParams()

  def grads(q, k, v):
    def loss(q, k, v):
      out = block_sparse_attention(q, k, v, info, scale=0.1, interpret=params)[0]
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  def kv_reads(counts):  # K and V are the kernels' refs[1] and refs[2]
    return {
      c.name: c.hbm_to_vmem_by_operand["refs[1]"] + c.hbm_to_vmem_by_operand["refs[2]"]
      for c in counts.per_call
    }

  grouped = kv_reads(dma_counts.count(grads, q, k, v))
  with mock.patch.object(tpu, "MAX_GROUP_ROWS", block):
    per_head = kv_reads(dma_counts.count(grads, q, k, v))
    expected = grads(q, k, v)
  for name in ("block_sparse_fwd", "block_sparse_dq"):
    assert 3.5 * grouped[name] <= per_head[name] <= 4.5 * grouped[name]
  assert grouped["block_sparse_dkv"] == per_head["block_sparse_dkv"]
  for g, ref_g in zip(grads(q, k, v), expected, strict=True):
    assert_close(g, ref_g, 1e-2, "grouped vs one head per block")


def test_tables_split_over_calls_give_the_unsplit_values_and_gradients():
  """With a tiny SMEM budget the forward, dq and dk/dv tables are split into calls over
  consecutive row ranges, each writing its rows of the full-size outputs in place; values and
  gradients equal those of one call per kernel (per-head mask, GQA, segments, sinks, softcap)."""
  seq, heads, kv_heads = 640, 4, 2
  info = mask_info(_windows_per_head(heads, 150), seq, seq, 128, 128, 0)
  keys = jax.random.split(jax.random.PRNGKey(5), 5)
  q = random_normal(keys[0], (1, seq, heads, 64), jnp.float32)
  k, v = (random_normal(key, (1, seq, kv_heads, 64), jnp.float32) for key in keys[1:3])
  ids = jnp.repeat(
    jnp.arange(2, dtype=jnp.int32), jnp.array([300, seq - 300]), total_repeat_length=seq
  )[None]
  sinks = random_normal(keys[3], (heads,), jnp.float32)
  weights = random_normal(keys[4], (1, seq, heads, 64), jnp.float32)

  def run(q, k, v, sinks):
    def loss(q, k, v, sinks):
      out, lse = block_sparse_attention(q, k, v, info, scale=0.125, segment_ids=(ids, ids),
                                        sinks=sinks, softcap=20.0, interpret=True)  # fmt: skip
      return (out * weights).sum() + lse.sum(), (out, lse)

    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks)

  whole = run(q, k, v, sinks)
  smem = tpu.table_smem_bytes(info, heads=heads, kv_heads=kv_heads)
  assert all(len(calls) == 1 for calls in smem.values())
  budget = min(max(calls) for calls in smem.values()) // 2
  with mock.patch.object(tpu, "TABLE_SMEM_BYTES", budget):
    split_smem = tpu.table_smem_bytes(info, heads=heads, kv_heads=kv_heads)
    assert all(len(calls) >= 2 for calls in split_smem.values())
    split = run(q, k, v, sinks)
  for got, want in zip(jax.tree.leaves(split), jax.tree.leaves(whole), strict=True):
    assert_close(got, want, 1e-5, "split tables vs one call")
