"""`attention_maps`: per layer and head, the weights each query puts on each key.

The maps are read from the reference path of each layer's own op: during an ordinary
(jitted) forward pass (`attnjax.analysis.hooks`) every layer's op arguments are recorded;
then the op is called again with `impl="reference"` on the same queries and keys and with the
values replaced by the identity (value `s` of key `s` is the one-hot vector `e_s`). Every
supported op computes `out_t = sum_s W[t, s] v_s` with weights that do not depend on the
values, so the output of that call is the weight matrix `W` itself, masks, segments,
softcapping, decay and normalization included, with no second copy of any variant's math.

What the rows hold:

- softmax family (`softmax`, `sliding_window`, `chunked`, `prefix_lm`, `gated`, `selective`,
  `moh`, `disentangled`): the attention probabilities; each row sums to 1 (0 for a row with
  no visible key). Output gates (`gated`), head routing weights (`moh`) and value
  temperatures (`selective`) multiply the output or the values, not the probabilities, and
  are left out: `moh` maps show every head, also where a token's router drops it.
- `sinks`: the probabilities of the real tokens; a row sums to `1 - sink mass`, the share
  taken by the learned sink logit and sink tokens (`attnjax.analysis.learned_sink_mass`).
- `softplus`: its normalized softplus weights (rows sum to 1).
- linear family: the equivalent causal weight matrix
  `W[t, s] = phi(scale * q_t) . (prod_{r=s+1..t} a_r) phi(k_s)`, divided by the row's
  normalizer where the variant normalizes (`linear`, `based`: rows sum to 1 up to the
  normalizer's eps; `flowformer`: rows sum to its allocation `sigmoid(I^_t)`, which scales the
  whole row). `lightning`, `retention`, `gla` and `lightnet` are unnormalized: their weights
  are returned as is (rows do not sum to 1 and weights may be negative). The output gates and
  norms of the gated linear mixers (GroupNorm for retention, per-head LayerNorm for gla,
  SRMSNorm for lightning; `attnjax.ops.linear.gates`) act after the op and are left out.

Other variants raise `ValueError` naming the variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.analysis.hooks import check_layers, intercept_layer_ops, layer_variants

# (positional extras after q, k, v; keyword arguments) -> the same for the identity-value
# call: factors outside the weights become neutral, value-shaped arguments match the identity.
Neutralizer = Callable[[tuple, dict, int], tuple[tuple, dict]]


def _unchanged(extras, kwargs, kv_len):
  return extras, kwargs


def _ungated(extras, kwargs, kv_len):
  (gate,) = extras  # [batch, q_len, heads, 1 | value_dim]
  return (jnp.ones((*gate.shape[:3], 1), jnp.float32),), kwargs


def _unrouted(extras, kwargs, kv_len):
  (head_weights,) = extras  # [batch, q_len, heads]
  return (jnp.ones(head_weights.shape, jnp.float32),), kwargs


def _without_value_temperature(extras, kwargs, kv_len):
  q_temp = extras[0]
  return (q_temp, None), kwargs


def _valueless_sink_tokens(extras, kwargs, kv_len):
  sink_v = kwargs.get("sink_v")
  if sink_v is None:
    return extras, kwargs
  return extras, {**kwargs, "sink_v": jnp.zeros((*sink_v.shape[:2], kv_len), jnp.float32)}


NEUTRALIZERS: dict[str, Neutralizer] = {
  "softmax": _unchanged,
  "sliding_window": _unchanged,
  "chunked": _unchanged,
  "prefix_lm": _unchanged,
  "softplus": _unchanged,
  "disentangled": _unchanged,
  "gated": _ungated,
  "moh": _unrouted,
  "selective": _without_value_temperature,
  "sinks": _valueless_sink_tokens,
  "linear": _unchanged,
  "lightning": _unchanged,
  "retention": _unchanged,
  "gla": _unchanged,
  "based": _unchanged,
  "lightnet": _unchanged,
  "flowformer": _unchanged,
}


def check_mappable(names: Sequence[str]) -> None:
  """Raises `ValueError` naming the first variant whose weights cannot be mapped."""
  for name in names:
    if name not in NEUTRALIZERS:
      raise ValueError(
        f"attention maps of variant {name!r} are not supported; supported variants: "
        f"{sorted(NEUTRALIZERS)}"
      )


def weight_matrix(variant: registry.Variant, args: tuple, kwargs: dict) -> jax.Array:
  """float32 `[batch, heads, q_len, kv_len]`: the weights of one recorded op call.

  `args`, `kwargs`: the call `variant.op(q, k, v, *extras, **kwargs)` as the mixer made it.
  """
  check_mappable([variant.name])
  q, k, v, *extras = args
  batch, kv_len, kv_heads = v.shape[:3]
  identity_values = jnp.broadcast_to(
    jnp.eye(kv_len, dtype=jnp.float32)[None, :, None, :], (batch, kv_len, kv_heads, kv_len)
  )
  extras, kwargs = NEUTRALIZERS[variant.name](tuple(extras), dict(kwargs), kv_len)
  weights = variant.op(
    q.astype(jnp.float32),
    k.astype(jnp.float32),
    identity_values,
    *extras,
    **{**kwargs, "impl": "reference"},
  )
  return jnp.transpose(weights.astype(jnp.float32), (0, 2, 1, 3))


def attention_maps(
  model,
  tokens: jax.Array,
  layers: Sequence[int] | None = None,
  *,
  segment_ids: jax.Array | None = None,
) -> dict[int, jax.Array]:
  """Per layer, the attention weights of every head on `tokens` (see the module docstring).

  Args:
    model: a stack of blocks such as `attnjax.nn.DecoderLM`, called as
      `model(tokens, segment_ids=segment_ids)`.
    tokens: int `[batch, seq]`.
    layers: layer indices to map (None: all).
    segment_ids: int `[batch, seq]` of packed sequences, or None.

  Returns:
    `{layer: float32 [batch, heads, seq, seq]}`, query rows by key columns.
  """
  names = layer_variants(model)
  layers = check_layers(layers, len(names))
  check_mappable([names[layer] for layer in layers])

  # A fresh function per call: the recording below happens while it is traced.
  def maps_of(model, tokens, segment_ids):
    calls: dict[int, tuple[registry.Variant, tuple, dict]] = {}

    def record(layer, variant, op):
      def recording_op(*args, **kwargs):
        if layer in layers:
          calls[layer] = (variant, args, kwargs)
        return op(*args, **kwargs)

      return recording_op

    with intercept_layer_ops(model, record):
      model(tokens, segment_ids=segment_ids)
    return {layer: weight_matrix(*calls[layer]) for layer in layers}

  return nnx.jit(maps_of)(model, jnp.asarray(tokens), segment_ids)
