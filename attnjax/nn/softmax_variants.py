"""NNX mixers of the softmax-family variants that own parameters beyond `Attention`'s.

Each mixer follows the mixer protocol (`cls(embed_dim, *, num_heads, num_kv_heads, head_dim,
variant, rngs, **options)`, called as `mixer(x [batch, seq, embed], *, segment_ids=None)`) and
calls its variant's op from `attnjax.ops`:

- `GatedAttention` (`gated`): sigmoid gate from the input on the attention output.
- `SinkAttention` (`sinks`): learned sink logit per head, optional learned sink tokens.
- `MoHAttention` (`moh`): router over heads; sows its load-balance loss as `aux_loss`.
- `AarenAttention` (`aaren`): a learned query attending causally, as a prefix scan.
- `DiffQKVAttention` (`diffqkv`): fewer K than V heads, K/V head dims apart, augmented Q.
- `DisentangledAttention` (`disentangled`): DeBERTa's content and relative-position terms.
- `SelectiveAttention` (`selective`): query temperature by token and position; value scale.
- `GaussianAttention` (`gaussian`): Gaussian density weights of value features per head.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.nn import cache as cache_lib
from attnjax.nn.attention import Attention, resolve_heads
from attnjax.nn.params import fan_in_init, param
from attnjax.nn.rope import apply_rope
from attnjax.nn.seq_parallel import SeqParallel, token_positions, variant_op
from attnjax.ops import moh_route
from attnjax.ops.softmax import aaren as aaren_ops
from attnjax.ops.softmax import cached
from attnjax.ops.softmax import gaussian as gaussian_ops
from attnjax.ops.softmax import sinks as sink_ops

AUX_LOSS = "aux_loss"  # name of the sown `nnx.Intermediate` the trainer adds to the loss


class GatedAttention(Attention):
  """Gated attention (Qiu et al. 2025): `W_O (sigmoid(x W_gate) * SDPA(q, k, v))`.

  `gate="elementwise"` gives `W_gate [embed, heads, head_dim]` (one gate per channel),
  `"headwise"` gives `W_gate [embed, heads, 1]` (one per head). Other options as `Attention`.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "gated",
    rngs: nnx.Rngs,
    gate: str = "elementwise",
    **attention_options,
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **attention_options)
    if gate not in ("elementwise", "headwise"):
      raise ValueError(f"gate must be 'elementwise' or 'headwise', got gate={gate!r}")
    _, num_heads, head_dim = self.q.shape
    gate_shape, gate_axes = (
      ((embed_dim, num_heads, head_dim), ("embed", "heads", "head_dim"))
      if gate == "elementwise"
      else ((embed_dim, num_heads, 1), ("embed", "heads", None))
    )
    self.gate = param(rngs, fan_in_init(), gate_shape, gate_axes)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    x, q, k, v = self.project_qkv(x)
    return self.project_out(self.attend(q, k, v, self._gate(x), segment_ids=segment_ids))

  def _gate(self, x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(jnp.einsum("btd,dhk->bthk", x, self.gate[...].astype(self.dtype)))

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """As `Attention.decode`, the attention gated per head (or channel)."""
    self._check_decodes()
    x, q, k, v = self.project_qkv(x, positions=position + jnp.arange(x.shape[1]))
    out, cache = self.cached_attend(q, k, v, cache, position)
    return self.project_out((out * self._gate(x)).astype(out.dtype)), cache


class SinkAttention(Attention):
  """Attention with a learned sink logit per head (StreamingLLM; gpt-oss) and, if
  `num_sink_tokens > 0`, that many learned sink tokens' keys and values per layer.

  Parameters beyond `Attention`: `sinks [heads]` (initialized to 0), `sink_k [n, kv_heads,
  head_dim]`, `sink_v [n, kv_heads, head_dim]`. Sink tokens carry no position (no rotary).
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "sinks",
    rngs: nnx.Rngs,
    num_sink_tokens: int = 0,
    **attention_options,
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **attention_options)
    num_heads = self.q.shape[1]
    if num_sink_tokens < 0:
      raise ValueError(f"num_sink_tokens must be >= 0, got {num_sink_tokens}")
    _, kv_heads, head_dim = self.k.shape
    self.sinks = param(rngs, nnx.initializers.zeros, (num_heads,), ("heads",))
    shape, axes = (num_sink_tokens, kv_heads, head_dim), (None, "kv_heads", "head_dim")
    sink_init = nnx.initializers.normal(1.0)
    self.sink_k = param(rngs, sink_init, shape, axes) if num_sink_tokens else None
    self.sink_v = param(rngs, sink_init, shape, axes) if num_sink_tokens else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    _, q, k, v = self.project_qkv(x)
    out = self.attend(q, k, v, segment_ids=segment_ids, sinks=self.sinks[...], **self._tokens())
    return self.project_out(out)

  def _tokens(self) -> dict:
    if self.sink_k is None:
      return {}
    return {
      "sink_k": self.sink_k[...].astype(self.dtype),
      "sink_v": self.sink_v[...].astype(self.dtype),
    }

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """As `Attention.decode`, with the sink logits and the sink tokens' keys and values."""
    self._check_decodes()
    _, q, k, v = self.project_qkv(x, positions=position + jnp.arange(x.shape[1]))
    sinks = self.sinks[...]
    if self.sink_k is None:
      out, cache = self.cached_attend(q, k, v, cache, position, sinks=sinks)
      return self.project_out(out), cache
    part, cache = self.cached_attend(q, k, v, cache, position, sinks=sinks, return_lse=True)
    tokens = self._tokens()
    sink_part = sink_ops.token_attention(q, tokens["sink_k"], tokens["sink_v"], **{
      key: value for key, value in self._keywords().items() if key in ("scale", "softcap")
    })  # fmt: skip
    out = sink_ops.merge_partial_attention(part, sink_part).astype(q.dtype)
    return self.project_out(out), cache


class MoHAttention(Attention):
  """Mixture-of-head attention (Jin et al. 2024): `sum_i g_i H_i W_O^i` with routed heads.

  The first `num_shared_heads` heads are always on; each token routes to `top_k` of the rest
  (defaults: a quarter of the heads shared, half of the others per token).
  Router parameters: `router_shared [embed, num_shared]`, `router_routed [embed, num_routed]`
  and `router_balance [embed, 2]` (the last two only with shared heads). Each call sows
  `aux_loss_weight * load_balance_loss` as `nnx.Intermediate` named `aux_loss`, which a loss
  function collects with `nnx.capture(model, nnx.Intermediate)` and adds.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "moh",
    rngs: nnx.Rngs,
    num_shared_heads: int | None = None,
    top_k: int | None = None,
    aux_loss_weight: float = 0.01,
    **attention_options,
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **attention_options)
    num_heads = self.q.shape[1]
    num_shared = num_heads // 4 if num_shared_heads is None else num_shared_heads
    num_routed = num_heads - num_shared
    top_k = max(1, num_routed // 2) if top_k is None else top_k
    if not 0 <= num_shared < num_heads or not 1 <= top_k <= num_routed:
      raise ValueError(
        f"need 0 <= num_shared_heads < num_heads={num_heads} and 1 <= top_k <= num_heads - "
        f"num_shared_heads, got num_shared_heads={num_shared}, top_k={top_k}"
      )
    self.top_k = top_k
    self.aux_loss_weight = aux_loss_weight
    self.router_routed = param(rngs, fan_in_init(), (embed_dim, num_routed), ("embed", None))
    self.router_shared = (
      param(rngs, fan_in_init(), (embed_dim, num_shared), ("embed", None)) if num_shared else None
    )
    self.router_balance = (
      param(rngs, fan_in_init(), (embed_dim, 2), ("embed", None)) if num_shared else None
    )

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    x, q, k, v = self.project_qkv(x)
    head_weights, balance_loss = self._route(x)
    with warnings.catch_warnings():
      # Sowing outside `nnx.capture` (a plain forward pass) is deprecated in flax; the value is
      # then kept on the module (the latest call's) instead of being collected.
      warnings.simplefilter("ignore", DeprecationWarning)
      self.sow(
        nnx.Intermediate,
        AUX_LOSS,
        self.aux_loss_weight * balance_loss,
        reduce_fn=lambda _, latest: latest,
      )
    out = self.attend(q, k, v, head_weights.astype(q.dtype), segment_ids=segment_ids)
    return self.project_out(out)

  def _route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(head weights `[batch, seq, heads]`, load-balance loss) of the tokens `x`."""
    routed = jnp.einsum("btd,dh->bth", x, self.router_routed[...].astype(self.dtype))
    if self.router_shared is None:
      # No shared heads: all weight goes to the routed stage.
      shared = jnp.zeros((*x.shape[:2], 0), x.dtype)
      balance = jnp.broadcast_to(jnp.array([-jnp.inf, 0.0], x.dtype), (*x.shape[:2], 2))
    else:
      shared, balance = (
        jnp.einsum("btd,dh->bth", x, w[...].astype(self.dtype))
        for w in (self.router_shared, self.router_balance)
      )
    return moh_route(shared, routed, balance, top_k=self.top_k)

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """As `Attention.decode`, each head's output weighted by the token's routing (the cache
    keeps every head's keys and values: a later token may route to any head)."""
    self._check_decodes()
    x, q, k, v = self.project_qkv(x, positions=position + jnp.arange(x.shape[1]))
    out, cache = self.cached_attend(q, k, v, cache, position)
    head_weights, _ = self._route(x)
    return self.project_out((head_weights[..., None] * out).astype(out.dtype)), cache


class AarenAttention(nnx.Module):
  """Aaren (Feng et al. 2024): a learned query attends causally over the projected keys and
  values, computed as a prefix scan; `[batch, seq, embed] -> same`.

  Parameters: `query [heads, head_dim]`, `k`, `v [embed, kv_heads, head_dim]`,
  `out [heads, head_dim, embed]`. The query is shared by all positions, so no rotary.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "aaren",
    rngs: nnx.Rngs,
    impl: str = "auto",
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
  ):
    num_kv_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    self.variant = variant
    self.impl = impl
    self.seq_parallel = seq_parallel
    self.dtype = dtype
    self.query = param(
      rngs, nnx.initializers.normal(1.0), (num_heads, head_dim), ("heads", "head_dim")
    )
    kv_axes = ("embed", "kv_heads", "head_dim")
    self.k = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), kv_axes)
    self.v = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), kv_axes)
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    if x.ndim != 3 or x.shape[-1] != self.k.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.k.shape[0]}], got shape {x.shape}")
    x = x.astype(self.dtype)
    k, v = (jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype)) for w in (self.k, self.v))
    q = self._query(x.shape[0])
    op = variant_op(self.variant, self.seq_parallel)
    out = op(q, k, v, segment_ids=segment_ids, impl=self.impl)
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype))

  def _query(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.query[...].astype(self.dtype), (batch, 1, *self.query.shape))

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """The empty prefix summary (running max, denominator, numerator per head): constant in
    `max_len`, always float32."""
    del max_len, dtype
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise cache_lib.no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")
    heads, head_dim = self.query.shape
    return {"state": aaren_ops.aaren_init_state(batch, heads, head_dim)}

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` after the cached prefix -> (out, cache with the new summary)."""
    del position  # the shared query has no position
    x = x.astype(self.dtype)
    k, v = (jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype)) for w in (self.k, self.v))
    out, state = aaren_ops.aaren_chunk(cache["state"], self._query(x.shape[0]), k, v)
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype)), {"state": state}


class DiffQKVAttention(nnx.Module):
  """Sigma's DiffQKV attention (Lin et al. 2025): `num_k_heads` K heads of `key_dim` channels,
  `num_kv_heads` V heads of `head_dim` channels, and, with `q_aug_dim`, an augmented Q.

  Parameters: `q [embed, heads, q_aug_dim or key_dim]`, with `q_aug_dim` also
  `q_aug [heads, q_aug_dim, key_dim]` (the Q head computed in the wider space, then mapped to
  the key space: Q-side parameters and compute only, nothing added to the KV cache);
  `k [embed, num_k_heads, key_dim]`, `v [embed, num_kv_heads, head_dim]`,
  `out [heads, head_dim, embed]`. Defaults: half as many K heads as V heads (when even),
  `key_dim = head_dim`, no augmentation. Rotary positions on q and k.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "diffqkv",
    rngs: nnx.Rngs,
    num_k_heads: int | None = None,
    key_dim: int | None = None,
    q_aug_dim: int | None = None,
    rope_base: float = 10_000.0,
    impl: str = "auto",
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
  ):
    num_v_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    if num_k_heads is None:
      num_k_heads = num_v_heads // 2 if num_v_heads % 2 == 0 else num_v_heads
    key_dim = head_dim if key_dim is None else key_dim
    if num_k_heads < 1 or num_v_heads % num_k_heads:
      raise ValueError(
        f"num_k_heads={num_k_heads} must divide the number of V heads num_kv_heads={num_v_heads}"
      )
    if key_dim < 2 or key_dim % 2:
      raise ValueError(f"key_dim must be even (rotary positions), got key_dim={key_dim}")
    if q_aug_dim is not None and q_aug_dim < key_dim:
      raise ValueError(f"q_aug_dim must be >= key_dim={key_dim}, got q_aug_dim={q_aug_dim}")
    self.variant = variant
    self.impl = impl
    self.rope_base = rope_base
    self.dtype = dtype
    self.seq_parallel = seq_parallel
    q_dim = key_dim if q_aug_dim is None else q_aug_dim
    self.q = param(rngs, fan_in_init(), (embed_dim, num_heads, q_dim), ("embed", "heads", None))
    self.q_aug = (
      None
      if q_aug_dim is None
      else param(
        rngs,
        fan_in_init(),
        (num_heads, q_aug_dim, key_dim),
        ("heads", None, "head_dim"),
      )
    )
    self.k = param(
      rngs, fan_in_init(), (embed_dim, num_k_heads, key_dim), ("embed", "kv_heads", "head_dim")
    )
    self.v = param(
      rngs, fan_in_init(), (embed_dim, num_v_heads, head_dim), ("embed", "kv_heads", "head_dim")
    )
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    q, k, v = self._project(x, token_positions(x.shape[1], self.seq_parallel))
    op = variant_op(self.variant, self.seq_parallel)
    out = op(q, k, v, segment_ids=segment_ids, impl=self.impl)
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype))

  def _project(self, x: jax.Array, positions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[b, t, heads, key_dim]`, k `[b, t, k_heads, key_dim]` (rotated at `positions`) and
    v `[b, t, v_heads, head_dim]` of `x [batch, seq, embed]`."""
    if x.ndim != 3 or x.shape[-1] != self.k.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.k.shape[0]}], got shape {x.shape}")
    x = x.astype(self.dtype)
    q, k, v = (
      jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype)) for w in (self.q, self.k, self.v)
    )
    if self.q_aug is not None:
      q = jnp.einsum("bthe,hek->bthk", q, self.q_aug[...].astype(self.dtype))
    q = apply_rope(q, positions, base=self.rope_base)
    k = apply_rope(k, positions, base=self.rope_base)
    return q, k, v

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Zero keys `[batch, max_len, k_heads, key_dim]` and values `[batch, max_len, v_heads,
    head_dim]`: the cache keeps the fewer K heads, as the paper intends."""
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise cache_lib.no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")
    _, k_heads, key_dim = self.k.shape
    _, v_heads, head_dim = self.v.shape
    return {
      "k": jnp.zeros((batch, max_len, k_heads, key_dim), dtype),
      "v": jnp.zeros((batch, max_len, v_heads, head_dim), dtype),
    }

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` at positions `position + [0, n)` -> (out, cache with its K/V);
    the K heads are repeated to the V heads only to attend."""
    q, k, v = self._project(x, position + jnp.arange(x.shape[1]))
    repeats = self.v.shape[1] // self.k.shape[1]

    def attention(q, k_rows, v_rows, **keywords):
      return cached.cached_attention(q, jnp.repeat(k_rows, repeats, axis=2), v_rows, **keywords)

    keywords = dict(registry.get(self.variant).defaults)
    out, cache = cache_lib.attend_and_store(q, k, v, cache, position, attention, keywords)
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype)), cache


class DisentangledAttention(Attention):
  """DeBERTa's disentangled attention (He et al. 2021): content and relative-position terms.

  Beyond `Attention`'s parameters: relative position embeddings `rel_embed [num_buckets,
  embed]` (the paper's P, 2k rows for k = num_buckets // 2) and their projections into
  position queries and keys, `q_rel [embed, heads, head_dim]` and `k_rel [embed, kv_heads,
  head_dim]` (the paper's W_{q,r}, W_{k,r}). `share_position_projections=True` projects P with
  the content `q` and `k` weights instead (DeBERTa v2's code), adding no projection.
  `max_distance` switches to v2's log buckets (see `attnjax.ops.disentangled_attention`).
  The paper shares P across layers; here every layer owns its own. Bidirectional unless
  `causal=True` (for next-token training); rotary positions are off by default, since the
  relative terms carry position.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "disentangled",
    rngs: nnx.Rngs,
    num_buckets: int = 32,
    max_distance: int | None = None,
    share_position_projections: bool = False,
    causal: bool = False,
    use_rope: bool = False,
    **attention_options,
  ):
    super().__init__(
      embed_dim,
      variant=variant,
      rngs=rngs,
      use_rope=use_rope,
      **attention_options,
    )
    if num_buckets < 2:
      raise ValueError(f"num_buckets must be >= 2, got num_buckets={num_buckets}")
    self.max_distance = max_distance
    self.causal = causal
    self.rel_embed = param(
      rngs, nnx.initializers.normal(1.0), (num_buckets, embed_dim), (None, "embed")
    )
    own = not share_position_projections
    q_axes, k_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
    self.q_rel = param(rngs, fan_in_init(), self.q.shape, q_axes) if own else None
    self.k_rel = param(rngs, fan_in_init(), self.k.shape, k_axes) if own else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    _, q, k, v = self.project_qkv(x)
    rel = self.rel_embed[...].astype(self.dtype)
    projections = (self.q, self.k) if self.q_rel is None else (self.q_rel, self.k_rel)
    q_rel, k_rel = (jnp.einsum("rd,dhk->rhk", rel, w[...].astype(self.dtype)) for w in projections)
    out = self.attend(
      q,
      k,
      v,
      q_rel,
      k_rel,
      segment_ids=segment_ids,
      max_distance=self.max_distance,
      causal=self.causal,
    )
    return self.project_out(out)


class SelectiveAttention(Attention):
  """Selective attention (Zhang et al. 2024): query and value temperatures on `Attention`.

      tau_q(i) = 1 + sigmoid(alpha_h) log(i + 1) + tanh(u_h . (x_i W_q))
      tau_v(j) = 1 + tanh(w_h . v_j)                  (with `value_temperature`)

  Weight-shared: the token terms read the query and value projections already computed, so
  the parameters added are `temp_pos [heads]`, `temp_q [heads, head_dim]` and `temp_v
  [kv_heads, head_dim]` (all initialized to 0), well under 1% of the layer. Both
  temperatures stay positive. Other options as `Attention`.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    variant: str = "selective",
    rngs: nnx.Rngs,
    value_temperature: bool = True,
    **attention_options,
  ):
    super().__init__(embed_dim, variant=variant, rngs=rngs, **attention_options)
    num_heads = self.q.shape[1]
    _, kv_heads, head_dim = self.k.shape
    zeros = nnx.initializers.zeros
    self.temp_pos = param(rngs, zeros, (num_heads,), ("heads",))
    self.temp_q = param(rngs, zeros, (num_heads, head_dim), ("heads", "head_dim"))
    self.temp_v = (
      param(rngs, zeros, (kv_heads, head_dim), ("kv_heads", "head_dim"))
      if value_temperature
      else None
    )

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    x, q, k, v = self.project_qkv(x)
    q_temp, v_temp = self._temperatures(x, v, jnp.arange(x.shape[1]))
    return self.project_out(
      self.attend(q, k, v, q_temp[..., None], v_temp, segment_ids=segment_ids)
    )

  def _temperatures(self, x, v, positions) -> tuple[jax.Array, jax.Array | None]:
    """(`tau_q [batch, seq, heads]`, `tau_v [batch, seq, kv_heads, 1]` or None) of the tokens
    `x` at int `positions [seq]` with values `v`."""
    # u . (x W_q) on the projection before rotary: the token term must not depend on position.
    token = jnp.einsum(
      "btd,dhk,hk->bth", x, self.q[...].astype(self.dtype), self.temp_q[...].astype(self.dtype)
    )
    log_pos = jnp.log1p(positions.astype(self.dtype))
    alpha = jax.nn.sigmoid(self.temp_pos[...].astype(self.dtype))
    q_temp = 1 + alpha[None, None, :] * log_pos[None, :, None] + jnp.tanh(token)
    if self.temp_v is None:
      return q_temp, None
    v_temp = 1 + jnp.tanh(jnp.einsum("bthk,hk->bth", v, self.temp_v[...].astype(self.dtype)))
    return q_temp, v_temp[..., None]

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """As `Attention.decode` on tempered queries; the cache keeps the tempered values."""
    self._check_decodes()
    positions = position + jnp.arange(x.shape[1])
    x, q, k, v = self.project_qkv(x, positions=positions)
    q_temp, v_temp = self._temperatures(x, v, positions)
    q = (q * q_temp[..., None]).astype(q.dtype)
    if v_temp is not None:
      v = (v * v_temp).astype(v.dtype)
    out, cache = self.cached_attend(q, k, v, cache, position)
    return self.project_out(out), cache


class GaussianAttention(nnx.Module):
  """Gaussian adaptive attention (Ioannides et al. 2024): each head weighs the features of its
  value projection by a Gaussian density around their (causal) context mean and variance.

  Parameters: `v [embed, heads, head_dim]`, `out [heads, head_dim, embed]`, and per head a mean
  offset `mean_offset [heads]` (initialized to 0) and `log_var_scale [heads]` (the variance
  scale is its exp, initialized to 1). There are no queries or keys, so `num_kv_heads` only
  has to be valid. `causal=False` takes whole-sequence statistics, as in the paper.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "gaussian",
    rngs: nnx.Rngs,
    causal: bool = True,
    eps: float = 1e-5,
    impl: str = "auto",
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
  ):
    _, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    self.variant = variant
    self.causal = causal
    self.eps = eps
    self.impl = impl
    self.dtype = dtype
    self.seq_parallel = seq_parallel
    self.v = param(
      rngs, fan_in_init(), (embed_dim, num_heads, head_dim), ("embed", "heads", "head_dim")
    )
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )
    zeros = nnx.initializers.zeros
    self.mean_offset = param(rngs, zeros, (num_heads,), ("heads",))
    self.log_var_scale = param(rngs, zeros, (num_heads,), ("heads",))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    if x.ndim != 3 or x.shape[-1] != self.v.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.v.shape[0]}], got shape {x.shape}")
    x = x.astype(self.dtype)
    v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(self.dtype))
    out = variant_op(self.variant, self.seq_parallel)(
      v,
      self.mean_offset[...],
      jnp.exp(self.log_var_scale[...]),
      causal=self.causal,
      segment_ids=segment_ids,
      eps=self.eps,
      impl=self.impl,
    )
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype))

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Zero running sums of the values and their squares `[batch, heads, head_dim]` (float32,
    constant in `max_len`): the causal statistics of every position so far."""
    del max_len, dtype
    if not self.causal:
      raise cache_lib.no_cache(self.variant, "the layer is not causal (causal=False)")
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise cache_lib.no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")
    _, heads, head_dim = self.v.shape
    zeros = jnp.zeros((batch, heads, head_dim), jnp.float32)
    return {"state": (zeros, zeros)}

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` at positions `position + [0, n)` -> (out, cache with the sums)."""
    x = x.astype(self.dtype)
    v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(self.dtype))
    out, sums = gaussian_ops.gaussian_chunk(
      v, self.mean_offset[...], jnp.exp(self.log_var_scale[...]), cache["state"], position,
      eps=self.eps,
    )  # fmt: skip
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype)), {"state": sums}
