"""Matplotlib figures of masks, BlockMasks, attention maps and per-head metrics.

Every function returns a `matplotlib.figure.Figure` built without pyplot (nothing is shown
and no global figure state is touched), so it works under any backend and in tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from attnjax import masks

# Tile colours of plot_block_mask, indexed by masks.EMPTY, PARTIAL, FULL.
TILE_COLORS = ("#f2f2f2", "#f4a259", "#2a6f97")
TILE_LABELS = ("empty (skipped)", "partial (masked)", "full (no mask)")


def _panel_figure(count: int, *, panel_size: float = 3.0) -> tuple[Figure, list]:
  fig = Figure(figsize=(panel_size * count, panel_size + 0.6), layout="constrained")
  return fig, [fig.add_subplot(1, count, i + 1) for i in range(count)]


def plot_mask(mask: masks.Mask | None, q_len: int, kv_len: int, *, title: str = "") -> Figure:
  """The dense boolean mask (one panel per head of a per-head mask); allowed keys are dark."""
  for name, value in (("q_len", q_len), ("kv_len", kv_len)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
  dense = masks.to_dense(mask, q_len, kv_len)
  dense = dense[None] if dense.ndim == 2 else dense
  fig, axes = _panel_figure(len(dense))
  for head, (ax, allowed) in enumerate(zip(axes, dense, strict=True)):
    ax.imshow(allowed, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(f"head {head}" if len(dense) > 1 else f"{allowed.mean():.1%} allowed")
  if title:
    fig.suptitle(title)
  return fig


def plot_block_mask(
  mask: masks.Mask | None, q_len: int, kv_len: int, block_q: int, block_kv: int, *, title=""
) -> Figure:
  """The tiles of `masks.block_mask(...)`: empty (skipped), partial (masked) or full, with
  the allowed positions of the dense mask shaded on top.

  One panel per mask head; the title gives the density (visited tiles / all tiles).
  """
  block = masks.block_mask(mask, q_len, kv_len, block_q, block_kv)
  kinds = block.tile_kinds()
  dense = masks.to_dense(mask, q_len, kv_len).reshape(-1, q_len, kv_len)
  fig, axes = _panel_figure(len(kinds), panel_size=3.6)
  cmap = ListedColormap(TILE_COLORS)
  for head, (ax, head_kinds) in enumerate(zip(axes, kinds, strict=True)):
    # Tile (i, j) covers queries [i bq, (i+1) bq) and keys [j bkv, (j+1) bkv).
    extent = (0, kinds.shape[2] * block_kv, kinds.shape[1] * block_q, 0)
    ax.imshow(head_kinds, cmap=cmap, vmin=0, vmax=2, extent=extent, interpolation="nearest")
    allowed = np.zeros((kinds.shape[1] * block_q, kinds.shape[2] * block_kv, 4))
    allowed[:q_len, :kv_len, 3] = 0.35 * dense[min(head, len(dense) - 1)]  # allowed: darker
    ax.imshow(allowed, extent=extent, interpolation="nearest")
    ax.set_xticks(np.arange(0, kinds.shape[2] + 1) * block_kv, minor=True)
    ax.set_yticks(np.arange(0, kinds.shape[1] + 1) * block_q, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    visited = (head_kinds != masks.EMPTY).mean()
    ax.set_title(f"head {head}: density {visited:.1%}" if len(kinds) > 1 else "")
  handles = [Patch(color=c, label=label) for c, label in zip(TILE_COLORS, TILE_LABELS, strict=True)]
  fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
  fig.suptitle(
    f"{title + ': ' if title else ''}{block_q}x{block_kv} tiles, density {block.density:.1%}"
  )
  return fig


def plot_attention_maps(
  maps: Mapping[int, jax.Array],
  *,
  example: int = 0,
  layers: Sequence[int] | None = None,
  heads: Sequence[int] | None = None,
  title: str = "",
) -> Figure:
  """A grid of attention maps of one `example`: a row per layer, a column per head."""
  if not maps:
    raise ValueError("maps must hold at least one layer, got an empty mapping")
  available = sorted(maps)
  layers = available if layers is None else list(layers)
  missing = sorted(set(layers) - set(available))
  if missing or not layers:
    raise ValueError(f"layers {missing or layers} not in maps (it holds layers {available})")
  first = np.asarray(maps[layers[0]])
  if first.ndim != 4 or not 0 <= example < first.shape[0]:
    raise ValueError(
      f"maps must be [batch, heads, q, k] with example in [0, batch), got shape {first.shape} "
      f"and example={example}"
    )
  heads = list(range(first.shape[1])) if heads is None else list(heads)
  if not heads or not all(0 <= h < first.shape[1] for h in heads):
    raise ValueError(f"heads must be indices in [0, {first.shape[1]}), got heads={heads}")
  fig = Figure(figsize=(2.4 * len(heads), 2.4 * len(layers) + 0.6), layout="constrained")
  grid = fig.subplots(len(layers), len(heads), squeeze=False)
  for row, layer in enumerate(layers):
    weights = np.asarray(maps[layer])[example]
    for col, head in enumerate(heads):
      ax = grid[row, col]
      ax.imshow(weights[head], cmap="viridis", interpolation="nearest")
      ax.set_title(f"layer {layer}, head {head}", fontsize="small")
      ax.set_xticks([])
      ax.set_yticks([])
  if title:
    fig.suptitle(title)
  return fig


def plot_head_metric(
  metric: Mapping[int, np.ndarray] | np.ndarray,
  *,
  title: str = "",
  vmin: float | None = None,
  vmax: float | None = None,
  cmap: str = "magma",
) -> Figure:
  """A `[layers x heads]` heatmap of a per-head metric, each cell annotated, with a colorbar.

  `metric` is `{layer: [heads]}` (as `sink_mass`, `retrieval_scores` return) or an array
  `[layers, heads]` (as `head_ablation_loss_change` returns; NaN cells are left blank).
  """
  if isinstance(metric, Mapping):
    if not metric:
      raise ValueError("metric must hold at least one layer, got an empty mapping")
    rows = sorted(metric)
    values = np.stack([np.asarray(metric[layer], np.float64) for layer in rows])
  else:
    values = np.asarray(metric, np.float64)
    rows = list(range(len(values)))
  if values.ndim != 2:
    raise ValueError(f"metric must be [layers, heads], got shape {values.shape}")
  fig = Figure(figsize=(1.0 + 0.7 * values.shape[1], 0.9 + 0.55 * values.shape[0]))
  fig.set_layout_engine("constrained")
  ax = fig.add_subplot()
  image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
  fig.colorbar(image, ax=ax)
  for (i, j), value in np.ndenumerate(values):
    if np.isfinite(value):
      color = "white" if image.norm(value) < 0.5 else "black"
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize="small")
  ax.set_xticks(range(values.shape[1]))
  ax.set_yticks(range(len(rows)), [str(layer) for layer in rows])
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  if title:
    ax.set_title(title)
  return fig
