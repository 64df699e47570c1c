"""Analysis of trained models: attention maps, attention sinks, retrieval heads, head
ablation, and figures. Pure functions over a model's parameters and inputs; the models'
training code paths are never changed (see `attnjax.analysis.hooks`).
"""

from attnjax.analysis.ablation import head_ablation_loss_change, mask_heads, num_heads
from attnjax.analysis.maps import attention_maps
from attnjax.analysis.plots import (
  plot_attention_maps,
  plot_block_mask,
  plot_head_metric,
  plot_mask,
)
from attnjax.analysis.recall import plot_recall_vs_state_size, state_size
from attnjax.analysis.retrieval import copy_batch, retrieval_scores
from attnjax.analysis.sinks import (
  SINK_THRESHOLD,
  learned_sink_mass,
  sink_fraction,
  sink_heads,
  sink_mass,
)

__all__ = [
  "SINK_THRESHOLD",
  "attention_maps",
  "copy_batch",
  "head_ablation_loss_change",
  "learned_sink_mass",
  "mask_heads",
  "num_heads",
  "plot_attention_maps",
  "plot_block_mask",
  "plot_head_metric",
  "plot_mask",
  "plot_recall_vs_state_size",
  "retrieval_scores",
  "sink_fraction",
  "sink_heads",
  "sink_mass",
  "state_size",
]
