"""Figures: each returns a Figure with one axes per panel (Agg backend, nothing shown)."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attnjax import masks
from attnjax.analysis import (
  plot_attention_maps,
  plot_block_mask,
  plot_head_metric,
  plot_mask,
)


def _drawn(fig: Figure) -> Figure:
  assert isinstance(fig, Figure)
  FigureCanvasAgg(fig).draw()  # rendering catches errors that building the figure does not
  return fig


def test_plot_mask_has_a_panel_per_mask_head():
  assert len(_drawn(plot_mask(masks.causal() & masks.chunked(8), 30, 30)).axes) == 1
  per_head = masks.per_head([masks.causal(), masks.sliding_window(4), masks.full()])
  assert len(_drawn(plot_mask(per_head, 21, 21)).axes) == 3


def test_plot_block_mask_shows_tiles_with_legend_and_density():
  mask = masks.sliding_window(15) | masks.sinks(4)
  fig = _drawn(plot_block_mask(mask, 100, 100, 16, 16, title="window"))
  assert len(fig.axes) == 1
  density = masks.block_mask(mask, 100, 100, 16, 16).density
  assert f"{density:.1%}" in fig.get_suptitle()
  labels = [text.get_text() for text in fig.legends[0].get_texts()]
  assert labels == ["empty (skipped)", "partial (masked)", "full (no mask)"]
  per_head = masks.per_head([masks.causal(), masks.sliding_window(8)])
  assert len(_drawn(plot_block_mask(per_head, 64, 48, 16, 16)).axes) == 2


def test_plot_attention_maps_is_a_layers_by_heads_grid():
  maps = {layer: np.random.default_rng(layer).random((2, 3, 9, 9)) for layer in (0, 2)}
  assert len(_drawn(plot_attention_maps(maps)).axes) == 6
  assert len(_drawn(plot_attention_maps(maps, layers=[2], heads=[0, 2], example=1)).axes) == 2


def test_plot_head_metric_is_a_heatmap_with_colorbar():
  fig = _drawn(plot_head_metric({0: np.array([0.1, 0.9]), 1: np.array([0.5, 0.2])}))
  assert len(fig.axes) == 2  # heatmap and colorbar
  image = fig.axes[0].images[0].get_array()
  np.testing.assert_allclose(image, [[0.1, 0.9], [0.5, 0.2]])
  with_nan = np.array([[0.3, np.nan], [0.1, -0.2]])
  assert len(_drawn(plot_head_metric(with_nan, title="loss change")).axes) == 2


def test_plots_reject_bad_arguments():
  with pytest.raises(ValueError, match="q_len"):
    plot_mask(masks.causal(), 0, 4)
  with pytest.raises(ValueError, match="block_q"):
    plot_block_mask(masks.causal(), 8, 8, 0, 4)
  with pytest.raises(ValueError, match="layers"):
    plot_attention_maps({0: np.ones((1, 2, 3, 3))}, layers=[1])
  with pytest.raises(ValueError, match="heads"):
    plot_attention_maps({0: np.ones((1, 2, 3, 3))}, heads=[2])
  with pytest.raises(ValueError, match="example"):
    plot_attention_maps({0: np.ones((1, 2, 3, 3))}, example=1)
  with pytest.raises(ValueError, match="metric"):
    plot_head_metric(np.ones(3))
