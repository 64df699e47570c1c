"""Linear attention family.

`api` (`linear_attention`, `linear_attention_step`) dispatches over `reference` (token-by-token
recurrence, the oracle), `chunk` (XLA chunked form) and `pallas` (the chunked-linear kernel);
`feature_maps` and `decay` hold the shared pieces, `gates` the output norms and gates of the
gated layers; `gla` (`gla_attention`), `hgrn2` (`hgrn2_attention`), `lightnet` and `flowformer`
are variant ops; `variants` registers linear, lightning, retention, gla, hgrn2, based, lightnet
and flowformer.
"""

from attnjax.ops.linear import variants  # noqa: F401  (registers the linear-family variants)
from attnjax.ops.linear.api import linear_attention, linear_attention_step
from attnjax.ops.linear.gla import gla_attention
from attnjax.ops.linear.hgrn2 import hgrn2_attention

__all__ = ["gla_attention", "hgrn2_attention", "linear_attention", "linear_attention_step"]
