"""TidalDecode: decoding with sparse attention whose positions persist across layers.

Yang et al. 2024, "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
Attention" (arXiv 2410.05076). The positions a decoding query attends to most overlap strongly
from one layer to the next, so a decode step chooses them in a few token-selection layers and
the others reuse them: layers before the first selection layer attend to the whole cache; a
selection layer attends to the whole cache and keeps the `top_k` positions its query attends
to most (the attention probabilities summed over all its heads); every later softmax layer
attends only to the latest selection and the current token, until the next selection layer
chooses again. Prefill chunks attend fully in every layer. The cache keeps every key (what a
step saves is the keys it reads); the paper's periodic cache correction is not implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnjax.nn import key_selection
from attnjax.ops.qkv import resolve_scale
from attnjax.ops.softmax import cached


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TidalDecode:
  """Choose the `top_k` most attended positions in the `selection_layers` (indices into the
  model's layers, ascending) and let the later softmax layers attend only to them and the
  current token (`DecoderLM.init_cache(..., policy=TidalDecode(256, (2, 13)))`)."""

  top_k: int = 256
  selection_layers: tuple[int, ...] = (2,)

  def __post_init__(self):
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
      raise ValueError(f"top_k must be an int >= 1, got top_k={self.top_k!r}")
    layers = tuple(self.selection_layers)
    if (
      not layers
      or any(not isinstance(i, int) or i < 0 for i in layers)
      or list(layers) != sorted(set(layers))
    ):
      raise ValueError(
        "selection_layers must be distinct layer indices >= 0 in ascending order, got "
        f"selection_layers={self.selection_layers!r}"
      )

  def layer_roles(self, num_layers: int) -> tuple[LayerRole, ...]:
    """Each layer's role: "dense" before the first selection layer, "select", then
    "sparse"."""
    if self.selection_layers[-1] >= num_layers:
      raise ValueError(
        f"selection_layers={self.selection_layers} name a layer the model's {num_layers} "
        "layers do not have"
      )
    first = self.selection_layers[0]
    return tuple(
      LayerRole("select" if i in self.selection_layers else "dense" if i < first else "sparse",
                self.top_k)
      for i in range(num_layers)
    )  # fmt: skip


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LayerRole:
  """One softmax layer's part in `TidalDecode`: "dense", "select" or "sparse"."""

  role: str
  top_k: int


def init_cache(role: LayerRole, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype):
  """Every position's keys and values `[batch, max_len, kv_heads, head_dim]` and the latest
  selection `chosen [batch, top_k]` (-1: none)."""
  rows = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
  chosen = jnp.full((batch, min(role.top_k, max_len)), -1, jnp.int32)
  return {"k": rows, "v": jnp.zeros_like(rows), "chosen": chosen, "policy": role}


def is_tidal(cache) -> bool:
  return isinstance(cache, dict) and isinstance(cache.get("policy"), LayerRole)


def attend(q, k, v, cache: dict, position, *, keywords: dict):
  """(the chunk's attention in this layer's role, the cache holding it); `cache["chosen"]`
  is the latest selection when a sparse layer is called, and this step's after a selection
  layer."""
  role: LayerRole = cache["policy"]
  keys, values = key_selection.store(cache, k, v, position)
  keywords = {**keywords, "scale": resolve_scale(keywords.get("scale"), q.shape[3])}
  cache = {**cache, "k": keys, "v": values}
  n = q.shape[1]
  if role.role == "sparse" and n == 1:
    chosen = jnp.where(cache["chosen"] == position, -1, cache["chosen"])
    current = jnp.full((chosen.shape[0], 1), position, jnp.int32)
    kept = jnp.concatenate([chosen, current], axis=1)[:, None, :]
    kept = jnp.broadcast_to(kept, (kept.shape[0], keys.shape[2], kept.shape[2]))
    return key_selection.attend_to(q, keys, values, kept, position, keywords), cache
  out, lse = cached.cached_attention(q, keys, values, q_start=position, return_lse=True, **keywords)
  if role.role == "select":
    chosen = key_selection.most_attended(
      q[:, -1:], keys, lse[:, -1:], position + n - 1, cache["chosen"].shape[1], keywords,
      per_kv_head=False,
    )  # fmt: skip
    cache = {**cache, "chosen": chosen}
  return out, cache
