"""Shape checks of `[batch, seq, heads, dim]` q, k, v (GQA by shape) and the default scale."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class QKVShape:
  """Sizes of a `[batch, seq, heads, dim]` attention call; `groups` query heads per kv head."""

  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  value_dim: int

  @property
  def groups(self) -> int:
    return self.heads // self.kv_heads


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, *, same_length: bool = False) -> QKVShape:
  """Validates `q [b, tq, h, d]`, `k [b, tk, hk, d]`, `v [b, tk, hk, dv]` with h % hk == 0.

  Raises:
    ValueError: naming the argument, the shape it got and the shape it wanted.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
  b, tq, h, d = q.shape
  _, tk, hk, _ = k.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(
      f"k must be [batch={b}, kv_len, kv_heads, head_dim={d}] like q {q.shape}, got {k.shape}"
    )
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(
      f"v must be [batch, kv_len, kv_heads, value_dim] = {k.shape[:3]} + (dv,) like k, "
      f"got {v.shape}"
    )
  if hk == 0 or h % hk:
    raise ValueError(
      f"q heads ({h}, q shape {q.shape}) must be a multiple of k/v heads ({hk}, k shape "
      f"{k.shape}) for grouped-query attention"
    )
  if same_length and tk != tq:
    raise ValueError(f"q and k must have the same length, got q {q.shape} and k {k.shape}")
  return QKVShape(b, tq, tk, h, hk, d, v.shape[3])


def resolve_scale(scale: float | None, head_dim: int) -> float:
  """`scale=None` means head_dim ** -0.5."""
  return head_dim**-0.5 if scale is None else float(scale)
