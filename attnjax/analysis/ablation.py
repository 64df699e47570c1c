"""Head ablation: zero chosen heads' attention outputs and measure the loss change.

Ablating a head sets its attention output (before the output projection) to zero, as
retrieval-head and AttentionInfluence studies do (Wu et al. 2024, arXiv 2404.15574; Hua et
al. 2025, "AttentionInfluence", arXiv 2505.07293). Ablating every head of a layer therefore
equals zeroing that layer's attention output. The model's code is untouched: the layers' ops
are wrapped while a `with mask_heads(...)` block runs (`attnjax.analysis.hooks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.analysis.hooks import check_layers, intercept_layer_ops, layer_variants


def num_heads(model) -> tuple[int, ...]:
  """The number of query heads of each layer (its output projection's leading axis)."""
  counts = []
  for layer, block in enumerate(model.blocks):
    out = getattr(block.mixer, "out", None)
    if out is None or len(out.shape) != 3:
      raise ValueError(
        f"layer {layer}'s mixer {type(block.mixer).__name__} has no output projection "
        "`out [heads, head_dim, embed]` to read its heads from"
      )
    counts.append(out.shape[0])
  return tuple(counts)


@contextlib.contextmanager
def scale_heads(model, head_scales: jax.Array) -> Iterator[None]:
  """Within the context, layer `l`'s attention output of head `h` is scaled by
  `head_scales[l, h]` (a float `[layers, max_heads]` array, which may be traced)."""
  counts = num_heads(model)
  wanted = (len(counts), max(counts))
  if jnp.shape(head_scales) != wanted:
    raise ValueError(
      f"head_scales must be [layers, heads] = {wanted}, got shape {jnp.shape(head_scales)}"
    )

  def scaled(layer, variant, op):
    def scaled_op(*args, **kwargs):
      out = op(*args, **kwargs)  # [batch, q_len, heads, value_dim]
      if out.ndim != 4 or out.shape[2] != counts[layer]:
        raise ValueError(
          f"variant {variant.name!r} returned shape {out.shape}, not [batch, seq, "
          f"heads={counts[layer]}, value_dim]: its heads cannot be ablated"
        )
      scales = head_scales[layer, : counts[layer]]
      return (out * scales[:, None].astype(out.dtype)).astype(out.dtype)

    return scaled_op

  with intercept_layer_ops(model, scaled):
    yield


def _keep_array(model, heads: Mapping[int, Sequence[int]]) -> np.ndarray:
  counts = num_heads(model)
  keep = np.ones((len(counts), max(counts)), np.float32)
  if heads:
    check_layers(list(heads), len(counts))
  for layer, layer_heads in heads.items():
    bad = [h for h in layer_heads if not 0 <= h < counts[layer]]
    if bad:
      raise ValueError(f"heads of layer {layer} must lie in [0, {counts[layer]}), got {bad}")
    keep[layer, list(layer_heads)] = 0.0
  return keep


@contextlib.contextmanager
def mask_heads(model, heads: Mapping[int, Sequence[int]]) -> Iterator[None]:
  """Within the context, the forward pass of `model` zeroes `heads` = `{layer: [head, ...]}`.

  Applies to forward passes traced inside the context (eager calls, or functions jitted
  inside it).
  """
  with scale_heads(model, jnp.asarray(_keep_array(model, heads))):
    yield


def _scalar_loss(loss_fn, model, batch) -> jax.Array:
  loss = loss_fn(model, batch)
  return loss[0] if isinstance(loss, tuple) else loss


def head_ablation_loss_change(
  model,
  batch: Mapping[str, jax.Array],
  loss_fn: Callable,
  layers: Sequence[int] | None = None,
) -> np.ndarray:
  """float64 `[layers, max_heads]`: loss with one head ablated minus the loss of the intact
  model (NaN for layers not in `layers` and for heads a layer does not have).

  `loss_fn(model, batch)` returns a scalar loss, or a tuple whose first item is one (as
  `attnjax.training.build.lm_loss` does).
  """
  counts = num_heads(model)
  layers = check_layers(layers, len(layer_variants(model)))

  @nnx.jit
  def loss_with(model, head_scales):
    with scale_heads(model, head_scales):
      return _scalar_loss(loss_fn, model, batch)

  keep = np.ones((len(counts), max(counts)), np.float32)
  base = float(loss_with(model, keep))
  change = np.full(keep.shape, np.nan)
  for layer in layers:
    for head in range(counts[layer]):
      ablated = keep.copy()
      ablated[layer, head] = 0.0
      change[layer, head] = float(loss_with(model, ablated)) - base
  return change
