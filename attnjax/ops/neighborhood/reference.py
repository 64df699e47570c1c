"""Local attention as dense masked softmax attention in float32: the oracle of this family."""

from __future__ import annotations

import functools
import math

import jax

from attnjax import masks as masks_lib
from attnjax.ops.neighborhood import window
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import reference as softmax_reference


# Jitted so that eager calls compile once; the geometry is static.
@functools.partial(jax.jit, static_argnames=("windows", "scale", "block_sizes"))
def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  windows: tuple[window.AxisWindow, ...],
  scale: float,
  block_sizes=None,
) -> jax.Array:
  """Materializes the `[N, N]` mask of `windows` (`N = prod(spatial)`) and attends densely.

  `q [batch, *spatial, heads, head_dim]`, `k [batch, *spatial, kv_heads, head_dim]`,
  `v [batch, *spatial, kv_heads, value_dim]` (validated by the public op) -> `out` like `q`
  with `value_dim`. `block_sizes` is accepted for a uniform signature and ignored.
  """
  del block_sizes
  spatial = q.shape[1:-2]
  num = math.prod(spatial)
  q_flat, k_flat, v_flat = (x.reshape(x.shape[0], num, *x.shape[-2:]) for x in (q, k, v))
  out, _ = softmax_reference.attention(
    q_flat,
    k_flat,
    v_flat,
    shape=check_qkv(q_flat, k_flat, v_flat),
    mask=masks_lib.from_array(window.dense_mask(spatial, windows)),
    segment_ids=None,
    scale=scale,
    softcap=None,
    sinks=None,
    q_offset=0,
  )
  return out.reshape(*q.shape[:-1], v.shape[-1])
