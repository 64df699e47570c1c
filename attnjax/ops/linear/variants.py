"""Linear-family variants, registered for models and configs (`attnjax.registry`).

Variants that differ from `linear_attention` only by arguments are registered with those
arguments as `defaults`; decay schedules that depend on the head count are thin wrappers.
BASED hybrids alternate `based` with `sliding_window` (softmax, `masks.sliding_window(w - 1)`)
through a model's `layer_pattern`, e.g. `"based,sliding_window"`.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.linear import agent, api, decay, flowformer, lightnet
from attnjax.ops.softmax import api as softmax_api

_MODULE = "attnjax.nn.linear:LinearAttention"
_CAPABILITIES = frozenset({"gqa", "state", "step", "causal", "bidirectional"})


def lightning_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int = 0, num_layers: int = 1, **kwargs
):
  """`linear_attention` with TransNormerLLM's per-head constant decay for `layer`."""
  log_decay = decay.lightning_log_decay(q.shape[2], layer, num_layers)
  return api.linear_attention(q, k, v, log_decay=jnp.asarray(log_decay), **kwargs)


def retention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs):
  """`linear_attention` with RetNet's multi-scale per-head decay `1 - 2^(-5 - h)`."""
  log_decay = decay.retention_log_decay(q.shape[2])
  return api.linear_attention(q, k, v, log_decay=jnp.asarray(log_decay), **kwargs)


# Ops that are `linear_attention` with a constant per-head decay computed from the head count
# (and their own options): op -> its decay function. Sequence parallelism hands the decay to
# every shard through `decay_preset_call`.
DECAY_PRESETS = {
  lightning_attention: decay.lightning_log_decay,
  retention: decay.retention_log_decay,
}


def decay_preset_call(op, heads: int, kwargs: dict) -> dict:
  """`linear_attention` keywords equal to calling decay preset `op` with `kwargs`."""
  decay_fn = DECAY_PRESETS[op]
  own = set(inspect.signature(decay_fn).parameters) - {"heads"}
  kwargs = dict(kwargs)
  decay_options = {name: kwargs.pop(name) for name in own & set(kwargs)}
  if "log_decay" in kwargs:
    raise ValueError(f"{op.__name__} computes its own log_decay; do not pass one")
  return {**kwargs, "log_decay": jnp.asarray(decay_fn(heads, **decay_options))}


def _register(name, op, paper, description, *, impl_names, capabilities=_CAPABILITIES, **defaults):
  registry.register(
    registry.Variant(
      name=name,
      family="linear",
      paper=paper,
      reference=functools.partial(op, impl="reference", **defaults),
      impls={impl: functools.partial(op, impl=impl, **defaults) for impl in impl_names},
      op=op,
      module=_MODULE,
      capabilities=capabilities,
      defaults=defaults,
      description=description,
    )
  )


_LINEAR_IMPLS = tuple(api.IMPLS)
_register(
  "linear",
  api.linear_attention,
  "Katharopoulos et al. 2020, Transformers are RNNs (arXiv 2006.16236)",
  "normalized linear attention, elu+1 features",
  impl_names=_LINEAR_IMPLS,
  feature_map="elu+1",
  normalize=True,
)
_register(
  "lightning",
  lightning_attention,
  "Qin et al. 2024, Lightning Attention-2 / TransNormerLLM (arXiv 2401.04658, 2307.14995)",
  "constant per-head decay (ALiBi slopes by depth), output gate, RMS norm",
  impl_names=_LINEAR_IMPLS,
)
_register(
  "retention",
  retention,
  "Sun et al. 2023, Retentive Network (arXiv 2307.08621)",
  "multi-scale retention: per-head decay 1 - 2^(-5-h)",
  impl_names=_LINEAR_IMPLS,
)
_register(
  "gla",
  api.linear_attention,
  "Yang et al. 2024, Gated Linear Attention Transformers (arXiv 2312.06635)",
  "data-dependent vector decay (log_decay [b, t, h, key_dim])",
  impl_names=_LINEAR_IMPLS,
)
_register(
  "based",
  api.linear_attention,
  "Arora et al. 2024, Simple linear attention language models (BASED, arXiv 2402.18668)",
  "2nd-order Taylor features, normalized; hybrid with sliding_window via layer_pattern",
  impl_names=_LINEAR_IMPLS,
  feature_map="taylor",
  normalize=True,
)
_register(
  "lightnet",
  lightnet.lightnet_attention,
  "Qin et al. 2024, You Only Scan Once: LightNet (arXiv 2405.21022)",
  "additive recurrence = decay z_{t-1}/z_t with keys exp(k_t)/z_t",
  impl_names=_LINEAR_IMPLS,
  capabilities=frozenset({"gqa", "state", "step", "causal"}),
)
_register(
  "flowformer",
  flowformer.flow_attention,
  "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows (ICML)",
  "sigmoid features, flow-conservation normalization",
  impl_names=_LINEAR_IMPLS,
  capabilities=frozenset({"gqa", "state", "step", "causal", "bidirectional"}),
)
_register(
  "agent",
  agent.agent_attention,
  "Han et al. 2024, Agent Attention (ECCV, arXiv 2312.08874)",
  "softmax through pooled agent tokens (bidirectional)",
  impl_names=tuple(softmax_api.IMPLS),
  capabilities=frozenset({"gqa", "bidirectional"}),
)
