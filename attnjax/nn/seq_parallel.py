"""`SeqParallel`: how a model's mixers run their attention op with the sequence split.

A `DecoderLM` built with `seq_parallel=SeqParallel(mesh, softmax="ring", linear="lasp2")`
checks every layer's variant once (`check`, at build time) and hands the context to its
mixers; each mixer then calls `variant_op(variant, seq_parallel)`: the variant's op wrapped by
`attnjax.parallel.sequence_parallel` with its family's strategy, or `registry.get(variant)`
without a context. On a mesh whose axis `axis` has one device (data parallelism) the context
splits no sequence: every variant's op runs per shard on its local batch
(`attnjax.parallel.per_shard.per_shard`), the form in which XLA compiles Pallas kernels.
Only the attention op runs under `shard_map`: projections, norms and MLPs stay ordinary code
on global arrays that GSPMD partitions. The context is a frozen, hashable dataclass, a static
attribute of the mixer (it adds no parameter), so a model's parameter tree is the same with
and without it and checkpoints interchange.

The sequence reaches the mixers in one layout (`attnjax.parallel.layout`) for the whole
model: `DecoderLM` takes `for_layers(layer names)`, which is the ring's zigzag layout when
every layer runs ring attention and natural order otherwise. In the zigzag layout the model
permutes its tokens once at its input and its hidden states back once at its output
(`to_layout`, `from_layout`), rotary embeddings rotate by each row's true position
(`token_positions`), and no ring layer exchanges queries or outputs. Linear recurrences
(LASP-2, ZeCO), all-gather and Ulysses take the natural order; moving to it and back at each
of their layers would add about two hidden-state shards per device per layer, far more than
a linear layer's state traffic, so a model with any such layer keeps the natural order (its
ring layers then relayout inside, as a standalone call does).

Layers qualify when their variant's `capabilities.split` says how it splits (see
`attnjax.registry.SPLITS`) for its family's strategy, the layer is causal, and (softmax
layers) the op returns its log-sum-exp, which every softmax strategy merges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import attnjax.parallel
from attnjax import registry
from attnjax.parallel import layout as layout_lib
from attnjax.parallel.layout import Layout
from attnjax.parallel.per_shard import per_shard


@dataclasses.dataclass(frozen=True)
class SeqParallel:
  """Sequence parallelism of the mixers' attention ops over mesh axis `axis`.

  Attributes:
    mesh: the `jax.sharding.Mesh` (or `AbstractMesh`) the model runs on.
    softmax: strategy of softmax layers, a key of `attnjax.parallel.api.SOFTMAX_STRATEGIES`.
    linear: strategy of linear layers, a key of `attnjax.parallel.api.LINEAR_STRATEGIES`.
    axis: the mesh axis the sequence is split over.
    batch_axes: the mesh axes the batch dimension is split over (e.g. `("data", "fsdp")`).
    layout: the order of the sequence the mixers receive, "natural" or "zigzag" (ring
      layers only); `DecoderLM` sets it with `for_layers`.
  """

  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
  softmax: str = "ring"
  linear: str = "lasp2"
  axis: str = "seq"
  batch_axes: tuple[str, ...] | None = None
  layout: Layout = "natural"

  @property
  def splits_sequence(self) -> bool:
    """Whether axis `axis` has more than one device; if not, ops run per batch shard."""
    return self.mesh.shape.get(self.axis, 1) > 1

  def for_layers(self, variants: Sequence[str]) -> SeqParallel:
    """This context in the layout of a model with these layers: zigzag iff all run ring."""
    all_ring = (
      self.splits_sequence
      and self.softmax == "ring"
      and all(registry.get(v).family == "softmax" for v in variants)
    )
    return dataclasses.replace(self, layout="zigzag" if all_ring else "natural")

  def positions(self, seq_len: int) -> jax.Array:
    """int32 `[seq_len]`: the true position of each row of a sequence in this layout."""
    parts = self.mesh.shape[self.axis]
    return jnp.asarray(layout_lib.positions(seq_len, parts, self.layout))

  def to_layout(self, x: jax.Array) -> jax.Array:
    """Natural-order `x [batch, seq, ...]` -> this layout."""
    if self.layout == "natural":
      return x
    return layout_lib.to_zigzag(x, self.mesh, self.axis, self.batch_axes)

  def from_layout(self, x: jax.Array) -> jax.Array:
    """`x [batch, seq, ...]` in this layout -> natural order."""
    if self.layout == "natural":
      return x
    return layout_lib.from_zigzag(x, self.mesh, self.axis, self.batch_axes)

  def strategy(self, variant: str) -> str:
    """The strategy of `variant`'s family; a `ValueError` for a family without one."""
    family = registry.get(variant).family
    strategies = {"softmax": self.softmax, "linear": self.linear}
    if family not in strategies:
      raise ValueError(
        f"layer variant {variant!r} ({family} family) has no sequence-parallel strategy; "
        f"sequence parallelism covers the softmax and linear families (set mesh.shape.seq=1)"
      )
    return strategies[family]

  def op(self, variant: str) -> Callable:
    """`variant`'s op on global `[batch, seq, heads, dim]` arrays, sharded over `axis`.

    Without a sequence split: the op per shard of the batch over `batch_axes`.
    """
    if not self.splits_sequence:
      return per_shard(registry.get(variant), self.mesh, self.batch_axes)
    return attnjax.parallel.sequence_parallel(
      variant,
      self.mesh,
      self.axis,
      self.strategy(variant),
      batch_axes=self.batch_axes,
      layout=self.layout,
    )

  def check(self, variant: str, options: Mapping[str, Any] | None = None) -> None:
    """Raises a `ValueError` naming `variant` and its strategy if its layer cannot be split.

    `options` are the layer's mixer options: `causal=False` (a bidirectional layer, whose
    every token needs the whole sequence) cannot be split. Without a sequence split every
    layer qualifies.
    """
    if not self.splits_sequence:
      return
    strategy, entry = self.strategy(variant), registry.get(variant)
    reason = None
    if (options or {}).get("causal", True) is False:
      reason = "the layer is bidirectional (causal=False)"
    elif entry.family == "softmax" and not entry.capabilities.lse:
      reason = "its op returns no log-sum-exp (return_lse=), which every softmax strategy needs"
    else:
      try:
        self.op(variant)
      except ValueError as e:
        reason = str(e)
    if reason is not None:
      raise ValueError(
        f"layer variant {variant!r} cannot run sequence-parallel with strategy {strategy!r}: "
        f"{reason}"
      )


def variant_op(variant: str, seq_parallel: SeqParallel | None) -> Callable:
  """The op a mixer calls: `registry.get(variant)`, or its sequence-parallel form."""
  return registry.get(variant) if seq_parallel is None else seq_parallel.op(variant)


def token_positions(seq_len: int, seq_parallel: SeqParallel | None) -> jax.Array:
  """int32 `[seq_len]`: the true position of each row a mixer receives (rotary angles)."""
  if seq_parallel is None:
    return jnp.arange(seq_len, dtype=jnp.int32)
  return seq_parallel.positions(seq_len)
