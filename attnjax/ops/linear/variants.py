"""Linear-family variants, registered for models and configs (`attnjax.registry`).

Each variant's op is a pure function of q, k, v (and per-token gate logits for GLA and HGRN2);
its NNX mixer (`attnjax.nn.linear`) owns the projections and, where the paper's layer has them,
the output norm and gate of `gates`. What each registered op computes (`phi` the feature map,
`scale` multiplying q before it, `a` the state decay):

- `linear` (Katharopoulos et al. 2020, Sec. 3.2): `o_i = phi(q_i) sum_j phi(k_j) v_j^T /
  phi(q_i) sum_j phi(k_j)` with `phi = elu + 1` and no scaling (`scale=1.0`).
- `based` (Arora et al. 2024, Sec. 4): the same normalized form with the 2nd-order Taylor map,
  `phi(scale q) . phi(k) = 1 + s + s^2 / 2`, `s = q.k / sqrt(d)` (`d` the q/k size, BASED's
  `feature_dim`), the expansion of `exp(q.k / sqrt(d))`.
- `lightning`, `retention`: constant per-head decays (`lightning_attention`, `retention`).
- `gla`: data-dependent vector decay (`gla.gla_attention`).
- `hgrn2`: HGRN's lower-bounded forget gate as the vector decay, its complement as the key
  (`hgrn2.hgrn2_attention`).
- `lightnet`: additive recurrence (`lightnet.lightnet_attention`).
- `flowformer`: flow-conservation normalization (`flowformer.flow_attention`).

Variants that preset `linear_attention` keywords split under sequence parallelism through
their `preset`, which gives the keywords of `linear_attention` that compute the same call.
BASED hybrids alternate `based` with `sliding_window` (softmax, `masks.sliding_window(w - 1)`)
through a model's `layer_pattern`, e.g. `"based,sliding_window"`.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.linear import api, decay, flowformer, gla, hgrn2, lightnet

# TransNormerLLM's queries and keys: swish(X W), unscaled (its norm after the op replaces the
# softmax scaling).
LIGHTNING_FEATURES = {"feature_map": "silu", "scale": 1.0}


def decay_keywords(decay_fn, kwargs: dict, heads: int) -> dict:
  """`linear_attention` keywords equal to a decay preset's call with `kwargs` on `heads`."""
  own = set(inspect.signature(decay_fn).parameters) - {"heads"}
  kwargs = dict(kwargs)
  decay_options = {name: kwargs.pop(name) for name in own & set(kwargs)}
  if "log_decay" in kwargs:
    raise ValueError("a decay preset computes its own log_decay; do not pass one")
  return {**kwargs, "log_decay": jnp.asarray(decay_fn(heads, **decay_options))}


def lightning_keywords(kwargs: dict, heads: int) -> dict:
  """`linear_attention` keywords equal to `lightning_attention(**kwargs)` on `heads`."""
  return decay_keywords(decay.lightning_log_decay, {**LIGHTNING_FEATURES, **kwargs}, heads)


def lightning_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int = 0, num_layers: int = 1, **kwargs
):
  """TransNormerLLM's lightning attention: swish features, a constant decay per head and depth.

  Qin et al. 2023, "TransNormerLLM" (arXiv 2307.14995, Sec. 3.1), computed blockwise by
  Lightning Attention-2 (Qin et al. 2024, arXiv 2401.04658):

      q_t = swish(q_t), k_t = swish(k_t)            (feature_map="silu", scale=1.0)
      S_t = lambda_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t
      lambda_h = exp(-s_h * (1 - layer / (num_layers - 1) + 1e-5)),   s_h = 2^(-8 h / H)

  (`decay.lightning_log_decay`; `H` heads, `h = 1..H`). `layer` is this layer's index among
  `num_layers`; other keywords are `linear_attention`'s (`feature_map`, `scale` override the
  swish features). The layer's SRMSNorm and output gate are `gates.srms_norm_gate`.
  """
  options = {**kwargs, "layer": layer, "num_layers": num_layers}
  return api.linear_attention(q, k, v, **lightning_keywords(options, q.shape[2]))


def retention_keywords(kwargs: dict, heads: int) -> dict:
  """`linear_attention` keywords equal to `retention(**kwargs)` on `heads`."""
  return decay_keywords(decay.retention_log_decay, kwargs, heads)


def retention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs):
  """RetNet's retention with multi-scale decay (Sun et al. 2023, arXiv 2307.08621, Sec. 2).

      o_n = sum_{m <= n} gamma_h^(n - m) (scale q_n) . k_m v_m,   gamma_h = 1 - 2^(-5 - h)

  for head `h = 0..H-1` (`decay.retention_log_decay`), `scale = head_dim ** -0.5` by default.
  q and k arrive with RetNet's rotation `e^(i n theta)` applied (the mixer's rotary
  embedding). Keywords are `linear_attention`'s. The paper's further normalizations of the
  retention scores are for numerical stability and cancel in the GroupNorm that follows;
  the layer's GroupNorm and swish gate are `gates.group_norm_swish_gate`.
  """
  return api.linear_attention(q, k, v, **retention_keywords(kwargs, q.shape[2]))


def same_keywords(kwargs: dict, heads: int) -> dict:
  """A variant that only presets `linear_attention` keywords passes its call through."""
  del heads
  return dict(kwargs)


_LINEAR = registry.Capabilities(
  causal=True, bidirectional=True, causal_keyword=True, state=True, split="state"
)
_MIXERS = "attnjax.nn.linear"


def _register(name, op, paper, description, *, mixer="LinearAttention", **options):
  registry.register(
    name,
    op,
    family="linear",
    paper=paper,
    description=description,
    impls=tuple(api.IMPLS),
    module=f"{_MIXERS}:{mixer}",
    **{"capabilities": _LINEAR, "preset": same_keywords, **options},
  )


def _gla_example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  gate_logits = jax.random.normal(jax.random.fold_in(key, 1), (batch, seq, heads, head_dim))
  return (q, k, v), {"gate_logits": gate_logits}


def _hgrn2_example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, _, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  forget_logits = 2.0 * jax.random.normal(
    jax.random.fold_in(key, 1), (batch, seq, kv_heads, head_dim)
  )
  lower_bound = jax.random.uniform(jax.random.fold_in(key, 2), (kv_heads, head_dim), maxval=0.9)
  k = hgrn2.hgrn2_keys(forget_logits, lower_bound)
  return (q, k, v), {"forget_logits": forget_logits, "lower_bound": lower_bound}


_register(
  "linear",
  api.linear_attention,
  "Katharopoulos et al. 2020, Transformers are RNNs (arXiv 2006.16236)",
  "normalized linear attention, elu+1 features",
  defaults={"feature_map": "elu+1", "normalize": True, "scale": 1.0},
)
_register(
  "lightning",
  lightning_attention,
  "Qin et al. 2024, Lightning Attention-2 / TransNormerLLM (arXiv 2401.04658, 2307.14995)",
  "swish features, constant per-head decay (ALiBi slopes by depth); SRMSNorm, output gate",
  mixer="LightningAttention",
  preset=lightning_keywords,
)
_register(
  "retention",
  retention,
  "Sun et al. 2023, Retentive Network (arXiv 2307.08621)",
  "multi-scale retention: per-head decay 1 - 2^(-5-h); rotary, GroupNorm, swish gate",
  mixer="MultiScaleRetention",
  preset=retention_keywords,
)
_register(
  "gla",
  gla.gla_attention,
  "Yang et al. 2024, Gated Linear Attention Transformers (arXiv 2312.06635)",
  "data-dependent decay sigmoid(gate_logits)^(1/16) per key channel; norm, swish gate",
  mixer="GatedLinearAttention",
  preset=gla.gla_keywords,
  example=_gla_example,
)
_register(
  "hgrn2",
  hgrn2.hgrn2_attention,
  "Qin et al. 2024, HGRN2: Gated Linear RNNs with State Expansion (arXiv 2404.07904)",
  "forget gate lb + (1 - lb) sigmoid, lb rising with depth; keys 1 - f; swish q, RMSNorm",
  mixer="HGRN2Attention",
  preset=hgrn2.hgrn2_keywords,
  example=_hgrn2_example,
)
_register(
  "based",
  api.linear_attention,
  "Arora et al. 2024, Simple linear attention language models (BASED, arXiv 2402.18668)",
  "2nd-order Taylor features of exp(q.k / sqrt(d)), normalized; hybrid with sliding_window",
  defaults={"feature_map": "taylor", "normalize": True},
  mixer="BasedAttention",
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
