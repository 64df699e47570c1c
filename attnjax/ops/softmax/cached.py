"""Softmax attention of new queries over a preallocated key/value cache (decoding).

A decoder keeps the keys and values of every position so far in `[batch, max_len, kv_heads,
dim]` buffers and appends each new chunk at its position. Positions are traced (one compiled
step serves every position), so the mask is evaluated on arrays (`Mask.on_arrays`) rather
than classified into tiles, and cache rows at or beyond the end of the new chunk are
excluded. The math is the float32 reference's (`reference.attend_allowed`), a block of
queries at a time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax.ops.qkv import check_qkv, resolve_scale
from attnjax.ops.softmax import reference

# Queries attended at once: a long prefill chunk holds [QUERY_BLOCK, cache rows] logits per
# head at a time, not [chunk, cache rows].
QUERY_BLOCK = 256


def cached_attention(
  q: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  *,
  q_start: jax.Array | int,
  kv_positions: jax.Array | None = None,
  mask: masks_lib.Mask | None = None,
  scale: float | None = None,
  softcap: float | None = None,
  sinks: jax.Array | None = None,
  return_lse: bool = False,
):
  """Attention of `q` at positions `q_start, ..., q_start + n - 1` over the cache.

  Args:
    q: `[batch, n, heads, head_dim]`, the new chunk's queries.
    k_cache: `[batch, max_len, kv_heads, head_dim]` holding the keys of positions
      `[0, q_start + n)` (the new chunk's included); later rows are ignored.
    v_cache: `[batch, max_len, kv_heads, value_dim]`, likewise.
    q_start: int32 scalar (may be traced), the position of `q[:, 0]`.
    kv_positions: int32 `[max_len]`, the position each cache row holds (a ring buffer's);
      None: row i holds position i. Rows at a negative position are empty.
    mask: the variant's `attnjax.masks.Mask` over absolute positions (None: causal). A
      query sees the cache rows written so far that the mask allows: a mask that lets a
      query see later positions (a bidirectional prefix) matches the full forward only for
      keys already in the cache, i.e. when the chunk holding them is decoded at once.
    scale, softcap, sinks, return_lse: as `dot_product_attention`.

  Returns:
    `[batch, n, heads, value_dim]` in q's dtype (a row with no allowed key gives zeros), and
    the float32 log-sum-exp `[batch, n, heads]` if `return_lse`.
  """
  shape = check_qkv(q, k_cache, v_cache)
  n = shape.q_len
  if kv_positions is None:
    kv_positions = jnp.arange(shape.kv_len, dtype=jnp.int32)
  kv_pos = jnp.asarray(kv_positions, jnp.int32)
  mask = masks_lib.causal() if mask is None else mask
  if mask.num_heads is not None and mask.num_heads != shape.heads:
    raise ValueError(f"mask has {mask.num_heads} heads, q has {shape.heads}")
  q_start = jnp.asarray(q_start, jnp.int32)
  # Rows written so far: up to the chunk's last position, the chunk's own included.
  written = (kv_pos >= 0) & (kv_pos < q_start + n)

  def block(q_block, block_start):
    q_pos = block_start + jnp.arange(q_block.shape[1], dtype=jnp.int32)
    if mask.num_heads is None:
      allowed = written[None, :] & mask.on_arrays(q_pos[:, None], kv_pos[None, :])
    else:
      heads = jnp.arange(shape.heads)[:, None, None]
      allowed = written & mask.on_arrays(q_pos[None, :, None], kv_pos[None, None, :], heads)
      allowed = allowed.reshape(shape.kv_heads, shape.groups, len(q_pos), shape.kv_len)
    block_shape = dataclasses.replace(shape, q_len=q_block.shape[1])
    return reference.attend_allowed(
      q_block, k_cache, v_cache, allowed, shape=block_shape, scale=resolve_scale(scale,
      shape.head_dim), softcap=softcap, sinks=sinks,
    )  # fmt: skip

  if n <= QUERY_BLOCK:
    out, lse = block(q, q_start)
  else:  # a long prefill: blocks of queries bound the [block, kv] logits held at once
    blocks = -(-n // QUERY_BLOCK)
    padded = jnp.pad(q, [(0, 0), (0, blocks * QUERY_BLOCK - n), (0, 0), (0, 0)])
    chunks = jnp.moveaxis(padded.reshape(shape.batch, blocks, QUERY_BLOCK, *q.shape[2:]), 1, 0)
    starts = q_start + QUERY_BLOCK * jnp.arange(blocks, dtype=jnp.int32)
    out, lse = jax.lax.map(lambda xs: block(*xs), (chunks, starts))
    out = jnp.moveaxis(out, 0, 1).reshape(shape.batch, -1, *out.shape[3:])[:, :n]
    lse = jnp.moveaxis(lse, 0, 1).reshape(shape.batch, -1, shape.heads)[:, :n]
  return (out, lse) if return_lse else out
