"""`LinearAttention`: the NNX mixer of the linear-family variants (`attnjax.ops.linear`).

One module serves `linear`, `lightning`, `retention`, `gla`, `based`, `lightnet`,
`flowformer` and `agent`; what differs per variant is a row of `DESIGNS`:

- `gated`: the output is RMS-normalized over head_dim and multiplied by `silu(x W_gate)`, the
  output gate of TransNormerLLM / Lightning Attention, RetNet and GLA.
- `data_decay`: GLA's low-rank data-dependent vector decay,
  `log_decay = log_sigmoid(x W_down W_up + b) / 16` (Yang et al. 2024, Sec. 4.1).
- `feature_dim`: q and k are projected to a small `feature_dim` (BASED's Taylor features,
  default 16, so the state's key_dim is 1 + 16 + 256) and scaled by `feature_dim ** -0.25` so
  that `phi(q) . phi(k)` expands `exp(q . k / sqrt(feature_dim))`.
- `op_options`: the mixer options forwarded to the variant's op.

Packed sequences (`segment_ids`) are not supported by the linear family yet: resetting the
state at document starts needs per-token state resets in the chunked forms.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.nn.attention import resolve_heads
from attnjax.nn.norm import rms_normalize
from attnjax.nn.params import fan_in_init, param
from attnjax.nn.seq_parallel import SeqParallel, variant_op

# GLA's decay projection rank and temperature (Yang et al. 2024: rank 16, divide by 16).
GLA_DECAY_RANK = 16
GLA_DECAY_TEMPERATURE = 16.0


@dataclasses.dataclass(frozen=True)
class Design:
  """What the mixer of one variant adds around its op (see the module docstring)."""

  gated: bool = False
  data_decay: bool = False
  feature_dim: bool = False
  op_options: tuple[str, ...] = ("causal", "chunk_size")


DESIGNS = {
  "linear": Design(),
  "lightning": Design(gated=True, op_options=("causal", "chunk_size", "layer", "num_layers")),
  "retention": Design(gated=True),
  "gla": Design(gated=True, data_decay=True),
  "based": Design(feature_dim=True),
  "lightnet": Design(op_options=("chunk_size",)),  # causal by construction
  "flowformer": Design(),
  "agent": Design(op_options=("num_agents",)),  # bidirectional by construction
}


class LinearAttention(nnx.Module):
  """Projections around a linear-family op: `[batch, seq, embed] -> same`.

  Parameters (logical axes): `q [embed, heads, qk_dim]`, `k [embed, kv_heads, qk_dim]`,
  `v [embed, kv_heads, head_dim]`, `out [heads, head_dim, embed]`; gated variants add
  `gate [embed, heads, head_dim]`; `gla` adds `decay_down [embed, 16]`,
  `decay_up [16, heads, head_dim]`, `decay_bias [heads, head_dim]`. `qk_dim` is head_dim, or
  `feature_dim` for `based`. With `seq_parallel` (see `attnjax.nn.seq_parallel`) the op runs
  with the sequence split over a mesh axis.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "linear",
    rngs: nnx.Rngs,
    impl: str = "auto",
    dtype=jnp.float32,
    feature_dim: int = 16,
    seq_parallel: SeqParallel | None = None,
    **op_options,
  ):
    if variant not in DESIGNS:
      raise ValueError(f"LinearAttention serves variants {sorted(DESIGNS)}, got {variant!r}")
    design = DESIGNS[variant]
    unknown = sorted(set(op_options) - set(design.op_options))
    if unknown:
      raise ValueError(
        f"variant {variant!r} takes options {design.op_options} (and feature_dim for based), "
        f"got unknown {unknown}"
      )
    num_kv_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    registry.get(variant)  # Fails early, listing the registered names.
    self.variant = variant
    self.design = design
    self.impl = impl
    self.seq_parallel = seq_parallel
    self.dtype = dtype
    self.op_options = tuple(sorted(op_options.items()))  # static, hashable
    qk_dim = feature_dim if design.feature_dim else head_dim
    self.qk_scale = qk_dim**-0.25 if design.feature_dim else 1.0
    self.q = param(rngs, fan_in_init(), (embed_dim, num_heads, qk_dim), ("embed", "heads", None))
    kv_axes = ("embed", "kv_heads", None)
    self.k = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, qk_dim), kv_axes)
    self.v = param(
      rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
    )
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )
    heads_axes = ("embed", "heads", "head_dim")
    self.gate = (
      param(rngs, fan_in_init(), (embed_dim, num_heads, head_dim), heads_axes)
      if design.gated
      else None
    )
    if design.data_decay:
      self.decay_down = param(rngs, fan_in_init(), (embed_dim, GLA_DECAY_RANK), ("embed", None))
      self.decay_up = param(
        rngs, fan_in_init(), (GLA_DECAY_RANK, num_heads, head_dim), (None, "heads", "head_dim")
      )
      self.decay_bias = param(
        rngs, nnx.initializers.zeros, (num_heads, head_dim), ("heads", "head_dim")
      )

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]` -> `[batch, seq, embed]`; `segment_ids` must be None."""
    if x.ndim != 3 or x.shape[-1] != self.q.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.q.shape[0]}], got shape {x.shape}")
    if segment_ids is not None:
      raise ValueError(
        f"variant {self.variant!r} does not support segment_ids (packed sequences) yet; "
        "pass segment_ids=None"
      )
    x = x.astype(self.dtype)

    def project(weight):
      return jnp.einsum("btd,dhk->bthk", x, weight[...].astype(self.dtype))

    q, k, v = project(self.q) * self.qk_scale, project(self.k) * self.qk_scale, project(self.v)
    options = dict(self.op_options)
    if self.design.feature_dim:
      options["scale"] = 1.0
    if self.design.data_decay:
      logits = (
        jnp.einsum("btd,dr,rhk->bthk", x, self.decay_down[...], self.decay_up[...])
        + self.decay_bias[...]
      )
      options["log_decay"] = jax.nn.log_sigmoid(logits.astype(jnp.float32)) / GLA_DECAY_TEMPERATURE
    op = variant_op(self.variant, self.seq_parallel)
    out = op(q, k, v, impl=self.impl, **options)
    if self.design.gated:
      out = rms_normalize(out) * jax.nn.silu(project(self.gate))
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype))
