"""Delta-rule variants, registered for models and configs (`attnjax.registry`).

- `deltanet` (Yang et al. 2024, arXiv 2406.06484): `delta_rule_attention` without decay.
- `gated_deltanet` (Yang, Kautz and Hatamizadeh 2024, arXiv 2412.06464): with Mamba-2's
  data-dependent decay per head (`gated.gated_delta_rule_attention`).

Both carry a state (a one-token `step`) and restart at document starts (`segment_ids`). Under
sequence parallelism (split "delta") LASP-2 gathers per-device (transition, state) summaries,
since the per-chunk transition is a matrix rather than a diagonal decay
(`attnjax.parallel.delta_rule`), and ZeCO scans them device to device (`attnjax.parallel.zeco`).
"""

from __future__ import annotations

import jax

from attnjax import registry
from attnjax.ops.delta import api, gated

_CAPABILITIES = registry.Capabilities(causal=True, segment_ids=True, state=True, split="delta")


def _example(key, *, batch, seq, heads, kv_heads, head_dim, gated_decay=False):
  keys = jax.random.split(key, 3)
  q, k, v = registry.random_qkv(
    keys[0], batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  k = k / jax.numpy.linalg.norm(k, axis=-1, keepdims=True)
  kwargs = {"beta": jax.nn.sigmoid(jax.random.normal(keys[1], (batch, seq, heads)))}
  if gated_decay:
    kwargs["log_decay"] = jax.nn.log_sigmoid(2.0 + jax.random.normal(keys[2], (batch, seq, heads)))
  return (q, k, v), kwargs


def _gated_example(key, **sizes):
  return _example(key, **sizes, gated_decay=True)


def _register(name, op, paper, description, example):
  registry.register(
    name,
    op,
    family="linear",
    paper=paper,
    description=description,
    capabilities=_CAPABILITIES,
    impls=tuple(api.IMPLS),
    module="attnjax.nn.delta:DeltaNet",
    example=example,
  )


_register(
  "deltanet",
  api.delta_rule_attention,
  "Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length "
  "(DeltaNet, arXiv 2406.06484)",
  "delta rule S += beta k (v - S^T k)^T, chunked by the UT transform; short convs, L2 q/k",
  _example,
)
_register(
  "gated_deltanet",
  gated.gated_delta_rule_attention,
  "Yang, Kautz and Hatamizadeh 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule "
  "(arXiv 2412.06464)",
  "delta rule with Mamba-2's data-dependent decay per head; short convs, gated RMSNorm",
  _gated_example,
)
