"""Decoder-only language model whose token mixer is chosen per layer by registry name.

    tokens -> embed -> N x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> logits

Each layer's mixer is `registry.mixer_class(name)(embed_dim, num_heads=..., num_kv_heads=...,
head_dim=..., variant=name, rngs=rngs, **mixer_options.get(name, {}))`, so any registered
variant (softmax, linear, ...) plugs in by name and `layer_pattern` builds hybrids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.nn import cache as cache_lib
from attnjax.nn import tidal
from attnjax.nn.attention import Attention
from attnjax.nn.mlp import SwiGLU
from attnjax.nn.norm import RMSNorm
from attnjax.nn.params import param
from attnjax.nn.seq_parallel import SeqParallel


def parse_layer_pattern(pattern: str | Sequence[str], depth: int) -> tuple[str, ...]:
  """The mixer name of each of `depth` layers.

  `pattern` is a sequence of names or a string shorthand `"based*3,softmax"` (comma-separated
  names, `*n` repeats a name); it is repeated to `depth`, which must be a multiple of its
  length. Every name must be registered.
  """
  if isinstance(pattern, str):
    names = []
    for item in pattern.split(","):
      name, _, count = item.strip().partition("*")
      if not name or (count and not count.strip().isdigit()):
        raise ValueError(f"layer_pattern item {item!r} must be 'name' or 'name*count'")
      names += [name.strip()] * (int(count) if count else 1)
  else:
    names = list(pattern)
  if not names or depth < 1 or depth % len(names):
    raise ValueError(
      f"depth={depth} must be a positive multiple of the layer_pattern length {len(names)} "
      f"(layer_pattern={pattern!r})"
    )
  known = registry.names()
  unknown = sorted({n for n in names if n not in known})
  if unknown:
    raise ValueError(f"layer_pattern names unknown variants {unknown}; registered: {known}")
  return tuple(names * (depth // len(names)))


class Block(nnx.Module):
  """Pre-norm residual block: `x + mixer(norm(x))`, then `x + mlp(norm(x))` if `mlp_dim`."""

  def __init__(self, embed_dim: int, mlp_dim: int, mixer: nnx.Module, *, rngs, dtype):
    self.mixer_norm = RMSNorm(embed_dim, rngs=rngs)
    self.mixer = mixer
    self.mlp_norm = RMSNorm(embed_dim, rngs=rngs) if mlp_dim else None
    self.mlp = SwiGLU(embed_dim, mlp_dim, rngs=rngs, dtype=dtype) if mlp_dim else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    x = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids).astype(x.dtype)
    return self._mlp(x)

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """The block on a chunk `x [batch, n, embed]` at `position` with its mixer's cache."""
    mixed, cache = self.mixer.decode(self.mixer_norm(x), cache, position)
    return self._mlp(x + mixed.astype(x.dtype)), cache

  def _mlp(self, x: jax.Array) -> jax.Array:
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return x


class DecoderLM(nnx.Module):
  """Token ids `[batch, seq]` -> float32 logits `[batch, seq, vocab]`.

  Args:
    vocab_size, embed_dim, depth: sizes; `mlp_dim=0` drops the MLP (Zoology's MQAR models).
    num_heads, num_kv_heads, head_dim: passed to every mixer.
    layer_pattern: mixer names, see `parse_layer_pattern`.
    mixer_options: per-variant keyword options, `{"sliding_window": {"window": 16}}`.
      A mixer whose math depends on its depth (`TAKES_DEPTH`: Lightning's decay, HGRN2's
      lower bounds) gets `layer` (its index among all `depth` layers, softmax ones included)
      and `num_layers=depth` unless its options set them.
    tie_embeddings: logits use the embedding matrix (else a separate `head [embed, vocab]`).
    dtype: activation dtype (parameters stay float32).
    seq_parallel: run every mixer's attention op with the sequence split over a mesh axis
      (see `attnjax.nn.seq_parallel`); every layer's variant is checked here. None: unsplit.
      A model whose every layer runs ring attention lays its sequence out in the ring's
      zigzag order once, from its tokens to its last hidden states; logits are in natural
      order either way.
  """

  def __init__(
    self,
    *,
    vocab_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    rngs: nnx.Rngs,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    layer_pattern: str | Sequence[str] = ("softmax",),
    mixer_options: Mapping[str, Mapping] | None = None,
    tie_embeddings: bool = True,
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
  ):
    self.layer_names = parse_layer_pattern(layer_pattern, depth)
    mixer_options = dict(mixer_options or {})
    unused = sorted(set(mixer_options) - set(self.layer_names))
    if unused:
      raise ValueError(f"mixer_options names {unused}, which no layer of {self.layer_names} uses")
    self.dtype = dtype
    # Unit-norm rows: tied logits `norm(x) @ embed.T` start with unit scale.
    self.embed = param(
      rngs, nnx.initializers.normal(embed_dim**-0.5), (vocab_size, embed_dim), ("vocab", "embed")
    )
    parallel_options = {}
    if seq_parallel is not None:
      seq_parallel = seq_parallel.for_layers(self.layer_names)
      for name in dict.fromkeys(self.layer_names):
        seq_parallel.check(name, mixer_options.get(name, {}))
      parallel_options = {"seq_parallel": seq_parallel}
    blocks = []
    for index, name in enumerate(self.layer_names):
      mixer_class = registry.mixer_class(name)
      options = mixer_options.get(name, {})
      if getattr(mixer_class, "TAKES_DEPTH", False):
        options = {"layer": index, "num_layers": depth, **options}
      mixer = mixer_class(
        embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        variant=name,
        rngs=rngs,
        **parallel_options,
        **options,
      )
      blocks.append(Block(embed_dim, mlp_dim, mixer, rngs=rngs, dtype=dtype))
    self.blocks = nnx.List(blocks)
    self.seq_parallel = seq_parallel
    self.final_norm = RMSNorm(embed_dim, rngs=rngs)
    self.head = (
      None
      if tie_embeddings
      else param(
        rngs, nnx.initializers.normal(embed_dim**-0.5), (embed_dim, vocab_size), ("embed", "vocab")
      )
    )

  def init_cache(self, batch_size: int, max_len: int, dtype=None, policy=None) -> dict:
    """An empty decoding cache for `batch_size` sequences of up to `max_len` tokens.

    A pytree (`{"layers": one cache per layer, "position": int32 0, "max_len"}`) for
    `decode`; softmax layers preallocate keys and values `[batch_size, max_len, kv_heads,
    head_dim]` in `dtype` (None: the model's activation dtype; windows keep a ring of their
    lookback), recurrent layers their state (None until the first `decode`). `policy`: what
    softmax layers keep and attend to instead of every position (`attnjax.nn.StreamingLLM`:
    attention sinks and a recent window, for streams longer than the training length;
    `attnjax.nn.RecycledAttention`: the whole cache only every few steps;
    `attnjax.nn.TidalDecode`: positions chosen in a few layers, attended by the later ones).

    Raises:
      ValueError: for a layer whose variant cannot decode (naming it), or bad sizes.
    """
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    dtype = self.dtype if dtype is None else dtype
    layers = []
    policies = [policy] * len(self.blocks)
    if isinstance(policy, tidal.TidalDecode):
      policies = list(policy.layer_roles(len(self.blocks)))
    for name, block, layer_policy in zip(self.layer_names, self.blocks, policies, strict=True):
      if not hasattr(block.mixer, "init_cache"):
        raise cache_lib.no_cache(name)
      if layer_policy is not None and isinstance(block.mixer, Attention):
        layers.append(block.mixer.init_cache(batch_size, max_len, dtype, layer_policy))
      else:
        layers.append(block.mixer.init_cache(batch_size, max_len, dtype))
    return {
      "layers": tuple(layers),
      "position": jnp.zeros((), jnp.int32),
      "max_len": jnp.asarray(max_len, jnp.int32),
    }

  def decode(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Logits of the next `n` tokens after those in `cache`; (logits, updated cache).

    Args:
      tokens: int `[batch, n]`, n >= 1 (a prompt chunk or one generated token).
      cache: from `init_cache` or a previous `decode`.

    Returns:
      float32 logits `[batch, n, vocab]` equal to those of `model(all tokens so far)` at
      these positions, and the cache holding them. Past tokens are not recomputed.

    Raises:
      ValueError: tokens not `[batch, n]` with the cache's batch, or (with a concrete
        position) more tokens than the cache holds.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f"tokens must be [batch, n] with n >= 1, got shape {tokens.shape}")
    batches = {x.shape[0] for x in jax.tree.leaves(cache["layers"]) if x.ndim}
    if batches - {tokens.shape[0]}:
      raise ValueError(
        f"tokens have batch {tokens.shape[0]} but the cache holds batch {sorted(batches)}"
      )
    position = cache["position"]
    if not isinstance(position, jax.core.Tracer) and not isinstance(
      cache["max_len"], jax.core.Tracer
    ):
      end = int(position) + tokens.shape[1]
      if end > int(cache["max_len"]):
        raise ValueError(
          f"tokens of shape {tokens.shape} after {int(position)} cached tokens exceed the "
          f"cache's max_len={cache['max_len']}"
        )
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    layers, chosen = [], None  # TidalDecode: the latest selection layer's positions
    for block, layer_cache in zip(self.blocks, cache["layers"], strict=True):
      if tidal.is_tidal(layer_cache) and chosen is not None:
        layer_cache = {**layer_cache, "chosen": chosen}
      x, layer_cache = block.decode(x, layer_cache, position)
      if tidal.is_tidal(layer_cache) and layer_cache["policy"].role == "select":
        chosen = layer_cache["chosen"]
      layers.append(layer_cache)
    logits = self._logits(self.final_norm(x))
    cache = {**cache, "layers": tuple(layers), "position": position + tokens.shape[1]}
    return logits, cache

  def _logits(self, x: jax.Array) -> jax.Array:
    head = self.embed[...].T if self.head is None else self.head[...]
    return jnp.einsum("btd,dv->btv", x, head.astype(self.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`tokens` int `[batch, seq]`, `segment_ids` int `[batch, seq]` -> `[batch, seq, vocab]`."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if self.seq_parallel is not None:
      tokens, segment_ids = (
        None if ids is None else self.seq_parallel.to_layout(ids) for ids in (tokens, segment_ids)
      )
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    for block in self.blocks:
      x = block(x, segment_ids=segment_ids)
    x = self.final_norm(x)
    if self.seq_parallel is not None:
      x = self.seq_parallel.from_layout(x)
    return self._logits(x)
