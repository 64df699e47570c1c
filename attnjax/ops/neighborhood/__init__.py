"""Neighborhood / local attention over 1-3 spatial axes: window math, reference, tiled, kernel.

`api.py` holds `neighborhood_attention` (NATTEN) and the shared `local_attention`; each other
variant has its file (`halo.py`, `maxvit.py`, `biformer.py`) with its registration.
"""

from attnjax.ops.neighborhood.api import local_attention, neighborhood_attention
from attnjax.ops.neighborhood.biformer import biformer_attention, route_regions
from attnjax.ops.neighborhood.blockwise import BlockSizes
from attnjax.ops.neighborhood.halo import halo_attention
from attnjax.ops.neighborhood.maxvit import maxvit_attention

__all__ = [
  "BlockSizes",
  "biformer_attention",
  "halo_attention",
  "local_attention",
  "maxvit_attention",
  "neighborhood_attention",
  "route_regions",
]
