"""Pure attention ops, one folder per family; importing this package registers all variants."""

from attnjax.ops.delta import delta_rule_attention, delta_rule_step, gated_delta_rule_attention
from attnjax.ops.linear import (
  gla_attention,
  hgrn2_attention,
  linear_attention,
  linear_attention_step,
)
from attnjax.ops.neighborhood import neighborhood_attention
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.softmax.aaren import aaren, aaren_chunk, aaren_init_state, aaren_step
from attnjax.ops.softmax.agent import agent_attention
from attnjax.ops.softmax.cca import cca_attention
from attnjax.ops.softmax.diffqkv import diffqkv_attention
from attnjax.ops.softmax.disentangled import disentangled_attention
from attnjax.ops.softmax.gated import gated_attention
from attnjax.ops.softmax.gaussian import gaussian_attention
from attnjax.ops.softmax.moh import moh_attention, moh_route
from attnjax.ops.softmax.selective import selective_attention
from attnjax.ops.softmax.sinks import sink_attention
from attnjax.ops.softmax.softplus import softplus_attention

__all__ = [
  "aaren",
  "aaren_chunk",
  "aaren_init_state",
  "aaren_step",
  "agent_attention",
  "cca_attention",
  "delta_rule_attention",
  "delta_rule_step",
  "diffqkv_attention",
  "disentangled_attention",
  "dot_product_attention",
  "gated_attention",
  "gated_delta_rule_attention",
  "gaussian_attention",
  "gla_attention",
  "hgrn2_attention",
  "linear_attention",
  "linear_attention_step",
  "moh_attention",
  "moh_route",
  "neighborhood_attention",
  "selective_attention",
  "sink_attention",
  "softplus_attention",
]
