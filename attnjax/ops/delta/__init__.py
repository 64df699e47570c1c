"""Delta-rule family (DeltaNet, Gated DeltaNet).

`api` (`delta_rule_attention`, `delta_rule_step`) dispatches over `reference` (token by token,
the oracle) and `chunk` (the XLA chunked UT form); `gated` holds Gated DeltaNet's decay gate
and op, `conv` the layers' causal short convolution; `variants` registers deltanet and
gated_deltanet.
"""

from attnjax.ops.delta import variants  # noqa: F401  (registers the delta-rule variants)
from attnjax.ops.delta.api import delta_rule_attention, delta_rule_step
from attnjax.ops.delta.gated import gated_delta_rule_attention

__all__ = ["delta_rule_attention", "delta_rule_step", "gated_delta_rule_attention"]
