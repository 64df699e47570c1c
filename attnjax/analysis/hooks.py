"""Observing the attention ops of a model's layers during an ordinary forward pass.

Every mixer in attnjax calls its attention op through `attnjax.registry.get(variant)(...)`.
`intercept_layer_ops` installs a `registry.intercept` hook for the duration of a `with` block
that hands each layer's op to a wrapper: the model's code is untouched, and training (which
never enters the context) runs exactly as before. Layers are attributed by call order, which is
layer order in a stack of blocks; each call is checked against the layer's variant name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from attnjax import registry

# wrap(layer, variant, op) -> the callable layer `layer` runs instead of `op`.
OpWrapper = Callable[[int, registry.Variant, Callable], Callable]


def layer_variants(model) -> tuple[str, ...]:
  """The variant name of each layer of `model` (a stack of blocks like `nn.DecoderLM`,
  built without sequence parallelism)."""
  blocks = getattr(model, "blocks", None)
  if blocks is None or not all(hasattr(getattr(b, "mixer", None), "variant") for b in blocks):
    raise ValueError(
      f"model must hold `blocks` whose `mixer` names its `variant` (like attnjax.nn.DecoderLM), "
      f"got {type(model).__name__}"
    )
  split = [i for i, b in enumerate(blocks) if getattr(b.mixer, "seq_parallel", None) is not None]
  if split:
    raise ValueError(
      f"layers {split} run sequence-parallel (seq_parallel is set): analysis needs the "
      "unsplit ops; build or restore the model with mesh.shape.seq=1"
    )
  return tuple(block.mixer.variant for block in blocks)


def check_layers(layers: Sequence[int] | None, depth: int) -> tuple[int, ...]:
  """`layers` (None: all) as a sorted tuple of valid layer indices of a `depth`-layer model."""
  if layers is None:
    return tuple(range(depth))
  layers = tuple(sorted({int(i) for i in layers}))
  bad = [i for i in layers if not 0 <= i < depth]
  if bad or not layers:
    raise ValueError(f"layers must be indices in [0, {depth}), got layers={layers}")
  return layers


@contextlib.contextmanager
def intercept_layer_ops(model, wrap: OpWrapper) -> Iterator[None]:
  """Within the context, layer `i` of `model` runs `wrap(i, variant, variant.op)` as its op.

  Applies to forward passes traced inside the context (eager calls, or functions jitted
  inside it). Ops called from within an intercepted op are left alone.
  """
  names = layer_variants(model)
  state = {"calls": 0, "depth": 0}

  def hook(variant: registry.Variant, inner: Callable) -> Callable:
    def op(*args, **kwargs):
      if state["depth"]:
        return inner(*args, **kwargs)
      layer = state["calls"] % len(names)
      if names[layer] != variant.name:
        raise ValueError(
          f"layer {layer} of the model runs variant {names[layer]!r} but the attention op "
          f"called in its turn is {variant.name!r}: its mixer calls ops in an order this "
          "analysis cannot attribute to layers"
        )
      state["calls"] += 1
      state["depth"] += 1
      try:
        return wrap(layer, variant, inner)(*args, **kwargs)
      finally:
        state["depth"] -= 1

    return op

  with registry.intercept(hook):
    yield
