"""Neighborhood / local attention over 1-3 spatial axes: window math, reference, tiled, kernel."""

from attnjax.ops.neighborhood.api import local_attention, neighborhood_attention
from attnjax.ops.neighborhood.blockwise import BlockSizes
from attnjax.ops.neighborhood.variants import (
  biformer_attention,
  halo_attention,
  maxvit_attention,
  route_regions,
)

__all__ = [
  "BlockSizes",
  "biformer_attention",
  "halo_attention",
  "local_attention",
  "maxvit_attention",
  "neighborhood_attention",
  "route_regions",
]
