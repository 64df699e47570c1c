"""`dot_product_attention`: softmax attention behind one signature, dispatched by `impl=`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax import registry
from attnjax.ops.qkv import QKVShape, check_qkv, resolve_scale
from attnjax.ops.softmax import blockwise, pallas, reference

IMPLS = {
  "reference": reference.attention,
  "xla": blockwise.attention,
  "pallas": pallas.attention,
  "pallas_interpret": pallas.interpreted,
}


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: masks_lib.Mask | None = None,
  segment_ids: jax.Array | masks_lib.SegmentIds | None = None,
  scale: float | None = None,
  softcap: float | None = None,
  sinks: jax.Array | None = None,
  q_offset: int = 0,
  impl: str = "auto",
  return_lse: bool = False,
  block_sizes: blockwise.BlockSizes | None = None,
):
  """Softmax attention `softmax(q k^T * scale + mask) v` over `[batch, seq, heads, dim]`.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA/MQA by shape).
    v: `[batch, kv_len, kv_heads, value_dim]`.
    mask: an `attnjax.masks.Mask` (None: no mask); per-head masks need `heads` heads.
    segment_ids: int `[batch, seq]` (self attention) or `attnjax.masks.SegmentIds` for
      packed sequences: tokens attend only within their segment.
    scale: logit scale; None means `head_dim ** -0.5`.
    softcap: if set, logits become `softcap * tanh(logits / softcap)` (Gemma 2).
    sinks: float `[heads]`, a learned logit per head that joins the softmax denominator but
      carries no value (gpt-oss; "attention sinks", Xiao et al. 2024).
    q_offset: absolute position of the first query (decoding: `kv_len - q_len`).
    impl: "reference" | "xla" | "pallas" | "pallas_interpret" | "auto".
    return_lse: also return the float32 log-sum-exp `[batch, q_len, heads]` of each row
      (sink included; -inf for a fully masked row), for merging partial results.
    block_sizes: tile sizes of the blockwise implementations (None: chosen by length).

  Returns:
    `out [batch, q_len, heads, value_dim]` in q's dtype, and `lse` if `return_lse`.
    A query row with no allowed key returns zeros.
  """
  shape = check_qkv(q, k, v)
  mask = _check_mask(mask, shape, q_offset)
  segment_ids = _check_segment_ids(segment_ids, shape)
  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if sinks.shape != (shape.heads,):
      raise ValueError(f"sinks must have shape [heads] = ({shape.heads},), got {sinks.shape}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be positive or None, got softcap={softcap!r}")
  out, lse = registry.dispatch(
    IMPLS,
    impl,
    q,
    k,
    v,
    shape=shape,
    mask=mask,
    segment_ids=segment_ids,
    scale=resolve_scale(scale, shape.head_dim),
    softcap=None if softcap is None else float(softcap),
    sinks=sinks,
    q_offset=q_offset,
    block_sizes=block_sizes,
  )
  return (out, lse) if return_lse else out


def _check_mask(mask, shape: QKVShape, q_offset) -> masks_lib.Mask | None:
  if mask is None:
    return None
  if not isinstance(mask, masks_lib.Mask):
    raise ValueError(
      f"mask must be an attnjax.masks.Mask (use masks.from_array for a boolean array), "
      f"got {type(mask).__name__}"
    )
  if not isinstance(q_offset, int | np.integer) or q_offset < 0:
    raise ValueError(f"q_offset must be a non-negative int, got q_offset={q_offset!r}")
  if mask.num_heads not in (None, shape.heads):
    raise ValueError(
      f"per-head mask has {mask.num_heads} heads but q has {shape.heads} heads (q shape "
      f"[{shape.batch}, {shape.q_len}, {shape.heads}, {shape.head_dim}])"
    )
  for array_mask in _array_masks(mask):
    wanted = (q_offset + shape.q_len, shape.kv_len)
    if array_mask.array.shape[-2:] != wanted:
      raise ValueError(
        f"mask array has shape {array_mask.array.shape} but needs [..., q_offset + q_len, "
        f"kv_len] = [..., {wanted[0]}, {wanted[1]}] for q_len={shape.q_len}, "
        f"kv_len={shape.kv_len}, q_offset={q_offset}"
      )
  return mask


def _array_masks(mask: masks_lib.Mask):
  if isinstance(mask, masks_lib.FromArray):
    yield mask
  for field in dataclasses.fields(mask) if dataclasses.is_dataclass(mask) else ():
    children = getattr(mask, field.name)
    for child in children if isinstance(children, tuple) else (children,):
      if isinstance(child, masks_lib.Mask):
        yield from _array_masks(child)


def _check_segment_ids(segment_ids, shape: QKVShape) -> masks_lib.SegmentIds | None:
  if segment_ids is None:
    return None
  if not isinstance(segment_ids, masks_lib.SegmentIds):
    segment_ids = masks_lib.SegmentIds(jnp.asarray(segment_ids))
  q_ids, kv_ids = jnp.asarray(segment_ids.q), jnp.asarray(segment_ids.kv_ids)
  if q_ids.shape != (shape.batch, shape.q_len):
    raise ValueError(
      f"segment_ids (query side) must be [batch, q_len] = ({shape.batch}, {shape.q_len}), "
      f"got {q_ids.shape}"
    )
  if kv_ids.shape != (shape.batch, shape.kv_len):
    raise ValueError(
      f"segment_ids (key side) must be [batch, kv_len] = ({shape.batch}, {shape.kv_len}), "
      f"got {kv_ids.shape}; pass masks.SegmentIds(q, kv) when q_len != kv_len"
    )
  for name, ids in (("segment_ids.q", q_ids), ("segment_ids.kv", kv_ids)):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
  return masks_lib.SegmentIds(q_ids, kv_ids, segment_ids.padding_id)
