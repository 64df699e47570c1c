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


def lightning_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int = 0, num_layers: int = 1, **kwargs
):
  """`linear_attention` with TransNormerLLM's per-head constant decay for `layer`."""
  options = {**kwargs, "layer": layer, "num_layers": num_layers}
  return api.linear_attention(
    q, k, v, **decay_keywords(decay.lightning_log_decay, options, q.shape[2])
  )


def retention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs):
  """`linear_attention` with RetNet's multi-scale per-head decay `1 - 2^(-5 - h)`."""
  return api.linear_attention(
    q, k, v, **decay_keywords(decay.retention_log_decay, kwargs, q.shape[2])
  )


def decay_keywords(decay_fn, kwargs: dict, heads: int) -> dict:
  """`linear_attention` keywords equal to a decay preset's call with `kwargs` on `heads`."""
  own = set(inspect.signature(decay_fn).parameters) - {"heads"}
  kwargs = dict(kwargs)
  decay_options = {name: kwargs.pop(name) for name in own & set(kwargs)}
  if "log_decay" in kwargs:
    raise ValueError("a decay preset computes its own log_decay; do not pass one")
  return {**kwargs, "log_decay": jnp.asarray(decay_fn(heads, **decay_options))}


def same_keywords(kwargs: dict, heads: int) -> dict:
  """A variant that only presets `linear_attention` keywords passes its call through."""
  del heads
  return dict(kwargs)


_LINEAR = registry.Capabilities(
  causal=True, bidirectional=True, causal_keyword=True, state=True, split="state"
)
_MODULE = "attnjax.nn.linear:LinearAttention"


def _register(name, op, paper, description, **options):
  registry.register(
    name,
    op,
    family="linear",
    paper=paper,
    description=description,
    impls=tuple(api.IMPLS),
    module=_MODULE,
    **{"capabilities": _LINEAR, "preset": same_keywords, **options},
  )


def _gla_example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  gate_logits = jax.random.normal(jax.random.fold_in(key, 1), (batch, seq, heads, head_dim))
  return (q, k, v), {"log_decay": jax.nn.log_sigmoid(gate_logits) / 16.0}


_register(
  "linear",
  api.linear_attention,
  "Katharopoulos et al. 2020, Transformers are RNNs (arXiv 2006.16236)",
  "normalized linear attention, elu+1 features",
  defaults={"feature_map": "elu+1", "normalize": True},
)
_register(
  "lightning",
  lightning_attention,
  "Qin et al. 2024, Lightning Attention-2 / TransNormerLLM (arXiv 2401.04658, 2307.14995)",
  "constant per-head decay (ALiBi slopes by depth), output gate, RMS norm",
  preset=functools.partial(decay_keywords, decay.lightning_log_decay),
)
_register(
  "retention",
  retention,
  "Sun et al. 2023, Retentive Network (arXiv 2307.08621)",
  "multi-scale retention: per-head decay 1 - 2^(-5-h)",
  preset=functools.partial(decay_keywords, decay.retention_log_decay),
)
_register(
  "gla",
  api.linear_attention,
  "Yang et al. 2024, Gated Linear Attention Transformers (arXiv 2312.06635)",
  "data-dependent vector decay (log_decay [b, t, h, key_dim])",
  example=_gla_example,
)
_register(
  "based",
  api.linear_attention,
  "Arora et al. 2024, Simple linear attention language models (BASED, arXiv 2402.18668)",
  "2nd-order Taylor features, normalized; hybrid with sliding_window via layer_pattern",
  defaults={"feature_map": "taylor", "normalize": True},
)
_register(
  "lightnet",
  lightnet.lightnet_attention,
  "Qin et al. 2024, You Only Scan Once: LightNet (arXiv 2405.21022)",
  "additive recurrence = decay z_{t-1}/z_t with keys exp(k_t)/z_t",
  capabilities=registry.Capabilities(causal=True, state=True),
  preset=None,
)
_register(
  "flowformer",
  flowformer.flow_attention,
  "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows (ICML)",
  "sigmoid features, flow-conservation normalization",
  capabilities=registry.Capabilities(
    causal=True, bidirectional=True, causal_keyword=True, state=True
  ),
  preset=None,
)
registry.register(
  "agent",
  agent.agent_attention,
  family="softmax",
  paper="Han et al. 2024, Agent Attention (ECCV, arXiv 2312.08874)",
  description="softmax through pooled agent tokens (bidirectional)",
  capabilities=registry.Capabilities(causal=False, bidirectional=True),
  impls=tuple(softmax_api.IMPLS),
  module=_MODULE,
  example=lambda key, **sizes: (registry.random_qkv(key, **sizes), {"num_agents": 4}),
)
