"""NNX mixers of the linear-family variants (`attnjax.ops.linear`) and of agent attention.

Each mixer owns its parameters and calls pure functions: its variant's op and, where the
paper's layer has them, the output norm and gate of `attnjax.ops.linear.gates`.

- `LinearAttention` (`linear`, `lightnet`, `flowformer`): q, k, v projections, the op, `W_O`.
- `BasedAttention` (`based`): q and k projected to a small `feature_dim` (the Taylor map's
  input).
- `LightningAttention` (`lightning`): TransNormerLLM's `SRMSNorm(O) * (X W_u)`.
- `MultiScaleRetention` (`retention`): RetNet's rotary q, k and `swish(X W_G) * GroupNorm(Y)`.
- `GatedLinearAttention` (`gla`): GLA's low-rank gate logits of the decay and
  `swish(X W_r + b_r) * LN(O)`.
- `HGRN2Attention` (`hgrn2`): HGRN2's swish output gate, forget gate with a learned lower
  bound per layer, and `RMSNorm(Y) W_O`.
- `AgentAttention` (`agent`): `Attention`'s projections around agent attention (its cost is
  linear in the sequence length).

Every mixer follows the mixer protocol: `cls(embed_dim, *, num_heads, num_kv_heads=None,
head_dim=None, variant, rngs, **options)`, called as `mixer(x [batch, seq, embed], *,
segment_ids=None)`; `impl`, `dtype` and `seq_parallel` (see `attnjax.nn.seq_parallel`) as
`Attention`. Packed sequences (`segment_ids`) are not supported by these mixers yet:
resetting the state at document starts needs per-token state resets in the chunked forms.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.nn.attention import Attention, resolve_heads
from attnjax.nn.cache import Step, no_cache
from attnjax.nn.params import fan_in_init, param
from attnjax.nn.rope import apply_rope
from attnjax.nn.seq_parallel import SeqParallel, variant_op
from attnjax.ops.linear import gates, hgrn2

# Rank of GLA's low-rank decay projection `W_a1 [embed, 16] W_a2 [16, key_dim]` (Sec. 4.4).
GLA_DECAY_RANK = 16


def _no_packed_sequences(variant: str, segment_ids) -> None:
  if segment_ids is not None:
    raise ValueError(
      f"variant {variant!r} does not support segment_ids (packed sequences) yet; "
      "pass segment_ids=None"
    )


class LinearAttention(nnx.Module):
  """Projections around a linear-family op: `[batch, seq, embed] -> same`.

  Parameters (logical axes): `q [embed, heads, qk_dim]`, `k [embed, kv_heads, qk_dim]`,
  `v [embed, kv_heads, head_dim]`, `out [heads, head_dim, embed]`. `qk_dim` (None: head_dim)
  is the size of each query and key head. Options: `chunk_size`, and `causal` where the op
  takes it; subclasses add their own (`OPTIONS`).
  """

  OPTIONS: tuple[str, ...] = ("chunk_size",)

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
    qk_dim: int | None = None,
    seq_parallel: SeqParallel | None = None,
    **op_options,
  ):
    mixer = registry.mixer_class(variant)  # Fails early, listing the registered names.
    if not isinstance(self, mixer):
      raise ValueError(
        f"{type(self).__name__} does not serve variant {variant!r}; its mixer is "
        f"{mixer.__module__}.{mixer.__name__}"
      )
    causal = ("causal",) if registry.get(variant).capabilities.causal_keyword else ()
    allowed = (*self.OPTIONS, *causal)
    unknown = sorted(set(op_options) - set(allowed))
    if unknown:
      raise ValueError(f"variant {variant!r} takes options {allowed}, got unknown {unknown}")
    num_kv_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    qk_dim = head_dim if qk_dim is None else qk_dim
    if qk_dim < 1:
      raise ValueError(f"qk_dim must be positive, got qk_dim={qk_dim}")
    self.variant = variant
    self.impl = impl
    self.seq_parallel = seq_parallel
    self.dtype = dtype
    self.op_options = tuple(sorted(op_options.items()))  # static, hashable
    self.q = param(rngs, fan_in_init(), (embed_dim, num_heads, qk_dim), ("embed", "heads", None))
    kv_axes = ("embed", "kv_heads", None)
    self.k = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, qk_dim), kv_axes)
    self.v = param(
      rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
    )
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )

  def project(self, x: jax.Array, weight: nnx.Param) -> jax.Array:
    """`x [batch, seq, embed]` times `weight [embed, heads, dim]`: `[batch, seq, heads, dim]`."""
    return jnp.einsum("btd,dhk->bthk", x, weight[...].astype(self.dtype))

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`x [batch, seq, embed]` -> (x in compute dtype, q, k, v `[batch, seq, heads, dim]`)."""
    if x.ndim != 3 or x.shape[-1] != self.q.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.q.shape[0]}], got shape {x.shape}")
    x = x.astype(self.dtype)
    return x, self.project(x, self.q), self.project(x, self.k), self.project(x, self.v)

  def attend(
    self, q: jax.Array, k: jax.Array, v: jax.Array, step: Step | None, **kwargs
  ) -> tuple[jax.Array, object]:
    """(out, final state) of the variant's op with this mixer's `impl` and static options.

    `step` None: whole sequences from a zero state (no state returned: None); else the
    decode call's chunk from `step.state`.
    """
    op = variant_op(self.variant, self.seq_parallel)
    options = {"impl": self.impl, **dict(self.op_options), **kwargs}
    if step is None:
      return op(q, k, v, **options), None
    return op(q, k, v, initial_state=step.state, return_final_state=True, **options)

  def project_out(self, heads_out: jax.Array) -> jax.Array:
    """`[batch, seq, heads, head_dim]` -> `[batch, seq, embed]`."""
    return jnp.einsum("bthk,hkd->btd", heads_out, self.out[...].astype(self.dtype))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]` -> `[batch, seq, embed]`; `segment_ids` must be None."""
    _no_packed_sequences(self.variant, segment_ids)
    return self.forward(x, None)[0]

  def forward(self, x: jax.Array, step: Step | None) -> tuple[jax.Array, object]:
    """(out `[batch, seq, embed]`, final state or None), see `attend`; subclasses add gates."""
    _, q, k, v = self.project_qkv(x)
    out, state = self.attend(q, k, v, step)
    return self.project_out(out), state

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """No state yet (None): the first `decode` starts as the op does without `initial_state`
    (a zero state is not always empty: LightNet's normalizer starts at z = 0)."""
    del batch, max_len, dtype
    self._check_decodes()
    return {"state": None}

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` at positions `position + [0, n)` -> (out, cache with its state)."""
    self._check_decodes()
    out, state = self.forward(x, Step(cache["state"], position))
    return out, {"state": state}

  def _check_decodes(self) -> None:
    if dict(self.op_options).get("causal", True) is False:
      raise no_cache(self.variant, "the layer is bidirectional (causal=False)")
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")


class BasedAttention(LinearAttention):
  """BASED's linear attention layer (Arora et al. 2024, arXiv 2402.18668, Sec. 4).

  q and k are projected to `feature_dim` per head (default 16, so the Taylor state's key_dim
  is `1 + 16 + 16^2`); the op's default scale `feature_dim ** -0.5` makes its features expand
  `exp(q.k / sqrt(feature_dim))`. Parameters as `LinearAttention` with `qk_dim = feature_dim`.
  """

  def __init__(
    self, embed_dim: int, *, variant: str = "based", rngs: nnx.Rngs, feature_dim: int = 16, **kw
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, qk_dim=feature_dim, **kw)


class LightningAttention(LinearAttention):
  """TransNormerLLM's gated linear attention (Qin et al. 2023, arXiv 2307.14995, Sec. 3.1).

      Q = swish(X W_Q), K = swish(X W_K), V = X W_V, U = X W_u      (swish: the op's)
      O = SRMSNorm(lightning_attention(Q, K, V)) * U,   out = O W_O

  Parameters beyond `LinearAttention`: `gate [embed, heads, head_dim]` (`W_u`). Options
  `layer`, `num_layers` choose the decay of this layer's depth; a `DecoderLM` passes each
  layer its own (`TAKES_DEPTH`).
  """

  OPTIONS = (*LinearAttention.OPTIONS, "layer", "num_layers")
  TAKES_DEPTH = True

  def __init__(self, embed_dim: int, *, variant: str = "lightning", rngs: nnx.Rngs, **kw):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **kw)
    embed, num_heads, head_dim = self.out.shape[2], *self.out.shape[:2]
    self.gate = param(
      rngs, fan_in_init(), (embed, num_heads, head_dim), ("embed", "heads", "head_dim")
    )

  def forward(self, x: jax.Array, step: Step | None) -> tuple[jax.Array, object]:
    x, q, k, v = self.project_qkv(x)
    out, state = self.attend(q, k, v, step)
    return self.project_out(gates.srms_norm_gate(out, self.project(x, self.gate))), state


class MultiScaleRetention(LinearAttention):
  """RetNet's gated multi-scale retention (Sun et al. 2023, arXiv 2307.08621, Sec. 2.2).

      Q = rot(X W_Q), K = rot(X W_K), V = X W_V      (rot: rotary positions, the paper's
                                                       e^(i n theta); `use_rope`)
      Y = GroupNorm_h(retention(Q, K, V)),   out = (swish(X W_G) * Y) W_O

  Parameters beyond `LinearAttention`: `gate [embed, heads, head_dim]` (`W_G`). Options
  `use_rope` (default True; needs an even qk_dim) and `rope_base`.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "retention",
    rngs: nnx.Rngs,
    use_rope: bool = True,
    rope_base: float = 10_000.0,
    **kw,
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **kw)
    if use_rope and self.q.shape[-1] % 2:
      raise ValueError(f"use_rope needs an even qk_dim, got {self.q.shape[-1]}")
    self.use_rope = use_rope
    self.rope_base = rope_base
    embed, num_heads, head_dim = self.out.shape[2], *self.out.shape[:2]
    self.gate = param(
      rngs, fan_in_init(), (embed, num_heads, head_dim), ("embed", "heads", "head_dim")
    )

  def forward(self, x: jax.Array, step: Step | None) -> tuple[jax.Array, object]:
    x, q, k, v = self.project_qkv(x)
    if self.use_rope:
      positions = jnp.arange(x.shape[1]) + (0 if step is None else step.start)
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    out, state = self.attend(q, k, v, step)
    return self.project_out(gates.group_norm_swish_gate(out, self.project(x, self.gate))), state


class GatedLinearAttention(LinearAttention):
  """The GLA Transformer's token mixer (Yang et al. 2024, arXiv 2312.06635, Sec. 4.4).

      gate_logits = X W_a1 W_a2 + b_a       (alpha = sigmoid(gate_logits) ** (1 / 16), the op's)
      O = gla_attention(X W_Q, X W_K, X W_V, gate_logits),   R = swish(X W_r + b_r)
      out = (R * LN(O)) W_O                 (LN over each head)

  Parameters beyond `LinearAttention`: `decay_down [embed, 16]` (`W_a1`),
  `decay_up [16, heads, qk_dim]` (`W_a2`), `decay_bias [heads, qk_dim]` (`b_a`),
  `gate [embed, heads, head_dim]` (`W_r`), `gate_bias [heads, head_dim]` (`b_r`). Option
  `temperature` (the op's `tau`).
  """

  OPTIONS = (*LinearAttention.OPTIONS, "temperature")

  def __init__(self, embed_dim: int, *, variant: str = "gla", rngs: nnx.Rngs, **kw):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **kw)
    embed, num_heads, qk_dim = self.q.shape
    head_dim = self.out.shape[1]
    self.decay_down = param(rngs, fan_in_init(), (embed, GLA_DECAY_RANK), ("embed", None))
    self.decay_up = param(
      rngs, fan_in_init(), (GLA_DECAY_RANK, num_heads, qk_dim), (None, "heads", "head_dim")
    )
    self.decay_bias = param(
      rngs, nnx.initializers.zeros, (num_heads, qk_dim), ("heads", "head_dim")
    )
    heads_axes = ("embed", "heads", "head_dim")
    self.gate = param(rngs, fan_in_init(), (embed, num_heads, head_dim), heads_axes)
    self.gate_bias = param(
      rngs, nnx.initializers.zeros, (num_heads, head_dim), ("heads", "head_dim")
    )

  def forward(self, x: jax.Array, step: Step | None) -> tuple[jax.Array, object]:
    x, q, k, v = self.project_qkv(x)
    low_rank = jnp.einsum("btd,dr->btr", x, self.decay_down[...].astype(self.dtype))
    decay_logits = jnp.einsum("btr,rhk->bthk", low_rank, self.decay_up[...].astype(self.dtype))
    out, state = self.attend(q, k, v, step, gate_logits=decay_logits + self.decay_bias[...])
    gate_logits = self.project(x, self.gate) + self.gate_bias[...].astype(self.dtype)
    return self.project_out(gates.group_norm_swish_gate(out, gate_logits)), state


class HGRN2Attention(LinearAttention):
  """HGRN2's token mixer HGRU2 (Qin et al. 2024, arXiv 2404.07904, Eq. 3).

      o_t = swish(x_t W_o),   z_t = x_t W_f,   i_t = x_t W_i
      f_t = beta + (1 - beta) * sigmoid(z_t)                 (the op's; keys 1 - f_t)
      Y = hgrn2_attention(o, 1 - f, i),   out = RMSNorm(Y) W_O

  The parameters of `LinearAttention` hold `W_o` (`q [embed, heads, qk_dim]`), `W_f`
  (`k [embed, kv_heads, qk_dim]`) and `W_i` (`v [embed, kv_heads, head_dim]`); `qk_dim` is
  the paper's expand ratio (each head's state is `[qk_dim, head_dim]`). Interpretations:

  - Activations follow the authors' released layer (flash-linear-attention's HGRN2Attention):
    swish on the output gate `o_t`, none on the input `i_t`, no short convolution.
  - RMSNorm is taken over all heads of a token, without a learned scale (`gates.srms_norm`;
    `W_O` follows and absorbs one). The output gate of the layer is `o_t` itself: there is no
    second gate.
  - Lower bounds: HGRN (Qin et al. 2023, arXiv 2311.04823) learns one parameter
    `[num_layers, channels]` for the whole stack and sets layer k's bound to the cumulative
    softmax over layers, `beta^k = sum_{1 <= j <= k} softmax_j`, 0 in the first layer and
    increasing with depth; zero-initialized, `beta^k = k / num_layers`. Mixers here are
    built one layer at a time and share no parameter, so each layer learns its own bounds,
    `beta = sigmoid(lower_bound_logits [kv_heads, qk_dim])`, initialized to the paper's
    `layer / num_layers`: bounds increase with depth at initialization, but training does
    not keep them ordered. Layer 0 has bound 0 and no such parameter, as in the paper.

  Options: `layer` (this layer's index) and `num_layers` (default 0 of 1: bound 0), beside
  `chunk_size` and `causal`; a `DecoderLM` passes each layer its own index (`TAKES_DEPTH`).
  """

  TAKES_DEPTH = True

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "hgrn2",
    rngs: nnx.Rngs,
    layer: int = 0,
    num_layers: int = 1,
    **kw,
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **kw)
    if not 0 <= layer < num_layers:
      raise ValueError(
        f"layer must be an index among num_layers={num_layers} layers, got layer={layer}"
      )
    self.layer, self.num_layers = layer, num_layers
    _, kv_heads, qk_dim = self.k.shape
    # sigmoid(log(l / (L - l))) = l / L; one assignment, so NNX sees a Param or a static None.
    self.lower_bound_logits = (
      None
      if layer == 0
      else param(
        rngs,
        nnx.initializers.constant(math.log(layer / (num_layers - layer))),
        (kv_heads, qk_dim),
        ("kv_heads", None),
      )
    )

  def lower_bound(self) -> float | jax.Array:
    """`beta`: 0.0 in the first layer, else float32 `[kv_heads, qk_dim]` in (0, 1)."""
    if self.lower_bound_logits is None:
      return 0.0
    return jax.nn.sigmoid(self.lower_bound_logits[...])

  def forward(self, x: jax.Array, step: Step | None) -> tuple[jax.Array, object]:
    _, output_gate, forget_logits, inputs = self.project_qkv(x)
    lower_bound = self.lower_bound()
    keys = hgrn2.hgrn2_keys(forget_logits, lower_bound)
    out, state = self.attend(
      jax.nn.silu(output_gate),
      keys,
      inputs,
      step,
      forget_logits=forget_logits,
      lower_bound=lower_bound,
    )
    return self.project_out(gates.srms_norm(out)), state


class AgentAttention(Attention):
  """`Attention`'s projections around agent attention (`attnjax.ops.softmax.agent`).

  Parameters as `Attention`; option `num_agents`. Rotary positions are off by default (the
  paper's agent tokens are pooled queries of a vision encoder, without rotary embedding).
  """

  def __init__(
    self, embed_dim: int, *, variant: str = "agent", rngs: nnx.Rngs, use_rope=False, **kw
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, use_rope=use_rope, **kw)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]` -> `[batch, seq, embed]`; `segment_ids` must be None."""
    _no_packed_sequences(self.variant, segment_ids)
    _, q, k, v = self.project_qkv(x)
    op = variant_op(self.variant, self.seq_parallel)
    return self.project_out(op(q, k, v, impl=self.impl, **dict(self.variant_options)))
