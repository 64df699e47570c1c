"""What a mixer keeps between `DecoderLM.decode` calls, and the errors of mixers that keep none.

Every decoding mixer has `init_cache(batch, max_len, dtype) -> cache` (a dict of arrays, a
pytree) and `decode(x [batch, n, embed], cache, position) -> (out, cache)`, `position` the
int32 position of `x[:, 0]` (may be traced). Softmax layers keep keys and values
(`[batch, max_len, kv_heads, head_dim]`), recurrent layers their state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec


class Step(NamedTuple):
  """A decode call as a recurrent mixer sees it.

  Attributes:
    state: the state entering the chunk (the op's `initial_state`; None: zeros).
    start: int32 position of the chunk's first token (rotary angles).
  """

  state: Any
  start: jax.Array | int


def no_cache(variant: str, why: str = "its mixer has no decoding cache yet") -> ValueError:
  """The error of a layer that cannot decode, naming the variant."""
  return ValueError(
    f"variant {variant!r} cannot decode: {why}. Decoding covers the mask variants of "
    "softmax attention (softmax, sliding_window, chunked, prefix_lm), gated, sinks, selective, "
    "moh, softplus and aaren, the linear-family mixers and the delta rule (deltanet, "
    "gated_deltanet)"
  )


def logical_specs(cache) -> Any:
  """The logical axes of every array of a `DecoderLM` cache, as `PartitionSpec`s of names.

  Keys and values `("batch", None, "kv_heads", "head_dim")`, recurrent states
  `("batch", "heads", None, ...)`, short-convolution inputs `("batch", None, None)`, the
  position and length `()`. Map them to mesh axes with the model's rules
  (`attnjax.training.sharding.tree_shardings`) to shard a cache like the model.
  """

  def spec(path, x):
    keys = {getattr(entry, "key", None) for entry in path}
    if keys & {"k", "v", "sink_k", "sink_v"}:
      return PartitionSpec("batch", None, "kv_heads", "head_dim")
    if "conv" in keys:
      return PartitionSpec("batch", None, None)
    if "state" in keys:
      return PartitionSpec("batch", "heads", *([None] * (x.ndim - 2)))
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, cache)
