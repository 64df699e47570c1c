"""Linear attention family.

`api` (`linear_attention`, `linear_attention_step`) dispatches over `reference` (token-by-token
recurrence, the oracle), `chunk` (XLA chunked form) and `pallas` (the chunked-linear kernel);
`feature_maps` and `decay` hold the shared pieces; `variants` registers linear, lightning,
retention, gla, based, lightnet (`lightnet`), flowformer (`flowformer`) and agent (`agent`).
"""

from attnjax.ops.linear import variants  # noqa: F401  (registers the linear-family variants)
from attnjax.ops.linear.api import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
