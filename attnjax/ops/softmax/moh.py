"""MoH: multi-head attention as mixture-of-head attention (Jin et al. 2024, "MoH: Multi-Head
Attention as Mixture-of-Head Attention", arXiv 2410.11842).

Heads are experts. Multi-head attention in summation form, `out_t = sum_i H_i(t) W_O^i`, becomes
a weighted sum over the heads a token activates. The first `h_s` heads are shared (always on);
of the remaining `h_r = h - h_s` routed heads each token keeps its top-k by router score. Per
token x_t, equation by equation:

    out_t = sum_i g_ti H_i(t) W_O^i                                (the mixer's output projection)
    g_ti  = a1_t softmax(W_s x_t)_i                      for shared heads i <= h_s
          = a2_t softmax(W_r x_t)_i  if (W_r x_t)_i in Top-K over the routed heads
          = 0                        otherwise
    (a1_t, a2_t) = softmax(W_h x_t)                      (two-stage weighting: shared vs routed)

and the load-balance loss over the routed heads, returned for the trainer to add as
`beta * L_b` (the paper's beta = 0.01):

    L_b = sum_{i > h_s} f_i P_i,   f_i = (1/T) sum_t 1(token t selects head i),
                                   P_i = (1/T) sum_t softmax(W_r x_t)_i

over the T tokens of the batch; balanced routing (f_i = k / h_r, P_i = 1 / h_r) gives k / h_r.
Interpretations: the routed softmax runs over all routed heads and is not renormalized over
the top-k (as the equation reads; the released code renormalizes over the selected heads,
rescales both stages by their head counts and multiplies L_b by h_r); T counts the batch's
tokens, padding included.

`moh_attention` computes `g * attention(q, k, v)` per head. Impl "reference" computes every
head and multiplies unselected ones by 0. Impl "xla" runs each (query block, head) tile under
`lax.cond` and skips the tiles that no token of the batch routes to: at decoding (one query)
that is every unselected head; with long blocks and per-token top-k few tiles are empty, so
`block_q` trades skipped work against loop overhead. Under `vmap` the cond becomes a select and
nothing is skipped. A skipped head's output is not computed, so the "xla" gradient with respect
to a zero head weight is 0; `moh_route` zeroes unselected heads through the top-k mask, which
passes no gradient there either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.ops.qkv import QKVShape, check_qkv
from attnjax.ops.softmax import api as softmax_api


def moh_route(
  shared_logits: jax.Array,
  routed_logits: jax.Array,
  balance_logits: jax.Array,
  *,
  top_k: int,
) -> tuple[jax.Array, jax.Array]:
  """Head weights and load-balance loss from router logits.

  Args:
    shared_logits: `[batch, seq, num_shared]` (`W_s x`).
    routed_logits: `[batch, seq, num_routed]` (`W_r x`).
    balance_logits: `[batch, seq, 2]` (`W_h x`), the shared/routed balance.
    top_k: routed heads kept per token, 1 <= top_k <= num_routed.

  Returns:
    `head_weights` float32 `[batch, seq, num_shared + num_routed]` (shared heads first; zero for
    heads a token does not select) and the scalar float32 load-balance loss `L_b`.
  """
  if shared_logits.shape[:2] != routed_logits.shape[:2] or balance_logits.shape != (
    *routed_logits.shape[:2],
    2,
  ):
    raise ValueError(
      f"router logits must be [batch, seq, num_shared], [batch, seq, num_routed] and "
      f"[batch, seq, 2], got {shared_logits.shape}, {routed_logits.shape}, {balance_logits.shape}"
    )
  num_routed = routed_logits.shape[-1]
  if not 1 <= top_k <= num_routed:
    raise ValueError(f"top_k must be in [1, num_routed={num_routed}], got top_k={top_k}")
  balance = jax.nn.softmax(balance_logits.astype(jnp.float32), axis=-1)
  shared = jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1)
  routed_probs = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)
  _, chosen = jax.lax.top_k(routed_probs, top_k)
  selected = jax.nn.one_hot(chosen, num_routed, dtype=jnp.float32).sum(-2)  # [b, t, h_r]
  weights = jnp.concatenate(
    [balance[..., :1] * shared, balance[..., 1:] * routed_probs * selected], axis=-1
  )
  tokens_per_head = selected.reshape(-1, num_routed).mean(0)
  mean_probs = routed_probs.reshape(-1, num_routed).mean(0)
  aux_loss = jnp.sum(tokens_per_head * mean_probs)
  return weights, aux_loss


def moh_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  head_weights: jax.Array,
  *,
  mask: masks.Mask | None = None,
  segment_ids: jax.Array | masks.SegmentIds | None = None,
  scale: float | None = None,
  softcap: float | None = None,
  q_offset: int = 0,
  impl: str = "auto",
  block_q: int = 64,
) -> jax.Array:
  """Per-head softmax attention weighted by `head_weights`; unselected heads give zeros.

  Args:
    q, k, v: as `attnjax.ops.dot_product_attention` (GQA by shape).
    head_weights: float `[batch, q_len, heads]`, zero for heads a token does not use
      (`moh_route`).
    mask, segment_ids, scale, softcap, q_offset: as `dot_product_attention`; per-head masks are
      not supported.
    impl: "reference" | "xla" | "auto".
    block_q: query block of the "xla" path's skip decision.

  Returns:
    `[batch, q_len, heads, value_dim]` in q's dtype: `head_weights[..., None] * attention`.
  """
  shape = check_qkv(q, k, v)
  wanted = (shape.batch, shape.q_len, shape.heads)
  if head_weights.shape != wanted:
    raise ValueError(
      f"head_weights must be [batch, q_len, heads] = {wanted}, got {head_weights.shape}"
    )
  if mask is not None and mask.num_heads is not None:
    raise ValueError(
      f"moh_attention takes a mask shared by all heads, got a per-head mask of {mask.num_heads}"
    )
  if not isinstance(block_q, int) or block_q < 1:
    raise ValueError(f"block_q must be a positive int, got block_q={block_q!r}")
  attention_kwargs = dict(
    mask=mask, segment_ids=segment_ids, scale=scale, softcap=softcap, q_offset=q_offset
  )
  return registry.dispatch(
    IMPLS, impl, q, k, v, head_weights, shape=shape, block_q=block_q, **attention_kwargs
  )


def _reference(q, k, v, head_weights, *, shape, block_q, **attention_kwargs):
  del shape, block_q
  out = softmax_api.dot_product_attention(q, k, v, impl="reference", **attention_kwargs)
  return (out * head_weights[..., None]).astype(q.dtype)


def _skipping(q, k, v, head_weights, *, shape: QKVShape, block_q, segment_ids, q_offset, **kwargs):
  if segment_ids is not None and not isinstance(segment_ids, masks.SegmentIds):
    segment_ids = masks.SegmentIds(jnp.asarray(segment_ids))
  blocks = []
  for lo in range(0, shape.q_len, block_q):  # static offsets: masks are analyzed per block
    hi = min(lo + block_q, shape.q_len)
    block_segments = None
    if segment_ids is not None:
      block_segments = masks.SegmentIds(
        segment_ids.q[:, lo:hi], segment_ids.kv_ids, segment_ids.padding_id
      )
    routed = jnp.any(head_weights[:, lo:hi] != 0, axis=(0, 1))  # [heads]

    def head_block(head, lo=lo, hi=hi, block_segments=block_segments, routed=routed):
      kv_head = head // shape.groups
      q_h = jax.lax.dynamic_slice_in_dim(q[:, lo:hi], head, 1, axis=2)
      k_h = jax.lax.dynamic_slice_in_dim(k, kv_head, 1, axis=2)
      v_h = jax.lax.dynamic_slice_in_dim(v, kv_head, 1, axis=2)

      def attend():
        return softmax_api.dot_product_attention(
          q_h, k_h, v_h, segment_ids=block_segments, q_offset=q_offset + lo, impl="xla", **kwargs
        )

      def skip():
        return jnp.zeros((shape.batch, hi - lo, 1, shape.value_dim), q.dtype)

      return jax.lax.cond(routed[head], attend, skip)[:, :, 0]

    per_head = jax.lax.map(head_block, jnp.arange(shape.heads))  # [heads, b, block, dv]
    blocks.append(jnp.moveaxis(per_head, 0, 2))
  out = jnp.concatenate(blocks, axis=1)
  return (out * head_weights[..., None]).astype(q.dtype)


IMPLS = {"reference": _reference, "xla": _skipping}


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  keys = jax.random.split(jax.random.fold_in(key, 1), 3)
  head_weights = moh_route(
    jax.random.normal(keys[0], (batch, seq, 1)),
    jax.random.normal(keys[1], (batch, seq, heads - 1)),
    jax.random.normal(keys[2], (batch, seq, 2)),
    top_k=1,
  )[0]
  return (q, k, v, head_weights), {"block_q": 8}


registry.register(
  "moh",
  moh_attention,
  family="softmax",
  paper="Jin et al. 2024, MoH: Multi-Head Attention as Mixture-of-Head Attention "
  "(arXiv 2410.11842)",
  description="heads as experts: shared heads + top-k routed heads per token, balance loss",
  capabilities=registry.Capabilities(causal=True, mask=True, segment_ids=True),
  impls=tuple(IMPLS),
  defaults={"mask": masks.causal()},
  module="attnjax.nn.softmax_variants:MoHAttention",
  example=_example,
)
