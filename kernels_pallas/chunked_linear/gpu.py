"""Chunked linear attention for GPUs (Pallas, Triton backend), parallel over chunks.

Same function and signature as `tpu.linear_attention`, and equal to
`attnjax.ops.linear.reference.linear_attention`. Qin et al. 2024, "Lightning Attention-2: A Free
Lunch for Handling Unlimited Sequence Lengths in Large Language Models" (arXiv 2401.04658) for
the intra/inter-chunk split; the two-pass schedule and the sub-chunk factorization of a decay per
key channel follow Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training" (arXiv 2312.06635).

With `G_i` the cumulative log decay from the chunk start to token i (chunk-relative, so no
exponent below is positive and nothing overflows for any sequence length) and `S_n` the state
chunk n starts from:

    o_i   = (q_i e^{G_i}) S_n + sum_{j <= i in the chunk} (q_i e^{G_i - G_j}) . k_j v_j
    S_n+1 = e^{G_C} S_n + sum_j (k_j e^{G_C - G_j})^T v_j

Forward, two kernels: a state pass, one program per (batch, head, tile of value columns),
walks the chunks in order with `S` in registers and writes every `S_n` (float32 `[batch, heads,
chunks, key_dim, value_dim]`) and the final state; then an output pass with one program per
(batch, head, chunk, value tile), all independent, reads its `S_n`. Value columns never mix, so
value tiles are independent programs. The sequential part is one `[C, key] x [C, value_tile]`
matmul per chunk; everything else runs in parallel over chunks.

A decay per token and head (`log_decay [batch, seq, heads, 1]`) gives the `[C, C]` scores by one
tensor-core matmul times a decay matrix. A decay per key channel (GLA, `[..., key_dim]`) cannot
be pulled out of the score matmul over a whole chunk without `e^{-G}` factors that overflow;
the chunk is cut into sub-chunks of `c` tokens: for query sub-chunk a and an earlier key
sub-chunk b, with `R = G` at a's first token, `(q e^{G - R}) (k e^{R - G})^T` is a tensor-core
matmul whose factors have exponents <= 0; only the `c` diagonal sub-chunk pairs are summed
channel by channel, exactly.

Backward: the state pass again (nothing per chunk is stored by the forward), a reverse pass
writing the gradient of every chunk's end state `dS` (and the initial state's gradient), then a
pass parallel over chunks for dq, dk and dv. The decay gradient needs no kernel: with `B_t` the
cumulative log decay from the sequence start, the function depends on B only through
`q_t e^{B_t}`, `k_t e^{-B_t}` and the final state's factor `e^{B_T}`, so
`dB_t = q_t dq_t - k_t dk_t (+ <dS_T, S_T> at t = T)` and `d log_decay` is its reverse
cumulative sum. Partial dq/dk sums over value tiles and over the query heads of a GQA group are
added outside the kernel.

Why Triton rather than Mosaic GPU: small `[C, C]` and `[C, key]` tiles with a sequential state
pass, which Triton lowers on every GPU that JAX supports; Mosaic GPU targets Hopper+ warpgroup
pipelines that pay off for large matmuls. Triton needs power-of-two tiles of at least 16
(`tl.dot`), so head dims are zero-padded to a power of two >= 16 and the sequence to a multiple
of C: a zero key or value adds nothing to the state, a zero query reads nothing, a zero log
decay on padded tokens keeps the state as it is, and the padded rows and columns are sliced off
(so padding does not change the function).

float32 inputs follow `jax.default_matmul_precision` (TF32 by default on hardware, IEEE float32
under "highest", which the 1e-4 float32 tolerance needs); 16-bit inputs feed bfloat16 matmul
operands (float32's range: the state may outgrow float16's) to the tensor cores with float32
accumulation. Decays, the diagonal sub-chunks' scores, the states and all outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common, triton
from kernels_pallas.chunked_linear.common import check_shapes, sum_groups
from kernels_pallas.triton import MIN_DOT, triton_call


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters of the Triton kernels (defaults not tuned on hardware).

  Attributes:
    chunk: tokens per chunk, the [C, C] intra-chunk tile (a power of two >= 16).
    sub_chunk: tokens per sub-chunk of a per-channel decay (a power of two in [16, chunk]):
      pairs of sub-chunks are tensor-core matmuls, the `chunk / sub_chunk` diagonal ones are
      summed channel by channel.
    block_value: value columns per program (a power of two >= 16; capped at the padded
      value dim). Smaller tiles mean more programs and fewer registers per program.
    num_warps: warps per program (a power of two, 1 to 32).
    num_stages: Triton software-pipelining stages of the state passes' chunk loops (>= 1).
  """

  chunk: int = 64
  sub_chunk: int = 16
  block_value: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("chunk", "sub_chunk", "block_value"):
      value = getattr(self, name)
      if not common.is_power_of_two(value) or value < MIN_DOT:
        raise ValueError(f"{name} must be a power of two >= {MIN_DOT}, got {name}={value}")
    if self.sub_chunk > self.chunk:
      raise ValueError(f"sub_chunk={self.sub_chunk} must be <= chunk={self.chunk}")
    if not common.is_power_of_two(self.num_warps) or self.num_warps > 32:
      raise ValueError(f"num_warps must be a power of two in [1, 32], got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


WIDE_ROW_TILE = 32


def default_block_sizes(key_dim: int, chunk: int = BlockSizes.chunk) -> BlockSizes:
  """`BlockSizes(chunk)` for the padded float32 `[C, key_dim]` rows (the kernels compute on
  float32 tiles whatever the input dtype): `WIDE_ROW_TILE` value columns per program from
  `triton.WIDE_ROW_BYTES` (key_dim 128: at 64 columns the IEEE float32 gradient asks an A100
  for 176 KB of its 163 KB of shared memory), and at most `WIDE_ROW_TILE` tokens per chunk
  beyond it (key_dim 256: more than an A100 has at 64 tokens, or tens of KB of spilled
  registers in bfloat16)."""
  row_bytes = common.next_power_of_two(key_dim, at_least=MIN_DOT) * 4
  if row_bytes > triton.WIDE_ROW_BYTES:
    return BlockSizes(chunk=min(chunk, WIDE_ROW_TILE), block_value=WIDE_ROW_TILE)
  if row_bytes == triton.WIDE_ROW_BYTES:
    return BlockSizes(chunk=chunk, block_value=WIDE_ROW_TILE)
  return BlockSizes(chunk=chunk)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  chunk: int
  sub_chunk: int
  block_value: int
  groups: int  # query heads per kv head
  vector: bool  # one log decay per key channel (else one per token and head)
  operand_dtype: jnp.dtype  # of the matmul operands
  interpret: bool
  num_warps: int
  num_stages: int


# ---------------------------------------------------------------------------------------------
# Kernel bodies. The state passes see whole sequences (`[t, d]` refs, chunk n at rows
# `n * C ...`); the chunk passes see one chunk (`[C, d]` refs).


def _rows(start, size):
  """Rows `start ... start + size` (`start` a multiple of `size`: a Python int or traced)."""
  return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, size), size)


def _chunk_decays(g_ref, start, chunk, vector):
  """`(decay_q, decay_k, decay_state)` of the chunk at rows `start...` of `g_ref` (G):
  `e^{G_i}` and `e^{G_C - G_j}` as `[C, key_dim | 1]`, and `e^{G_C}`, a column `[key_dim, 1]`
  for the vector decay, else a scalar."""
  if vector:
    g, g_last = g_ref[_rows(start, chunk), :], g_ref[start + chunk - 1, :]
    return jnp.exp(g), jnp.exp(g_last[None, :] - g), jnp.exp(g_last)[:, None]
  g, g_last = g_ref[_rows(start, chunk)], g_ref[start + chunk - 1]
  return jnp.exp(g)[:, None], jnp.exp(g_last - g)[:, None], jnp.exp(g_last)


def _load(ref, start, size):
  return ref[_rows(start, size), :].astype(jnp.float32)


def _decay_matrix(g):
  """Scalar decay, `g` = G [C]: `D_ij = e^{G_i - G_j}` for j <= i, else 0 ([C, C])."""
  chunk = g.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return jnp.where(rows >= cols, jnp.exp(jnp.minimum(g[:, None] - g[None, :], 0.0)), 0.0)


def _key_row(refs, row):
  """Token `row` of k, v (float32 [key_dim], [value_tile]) and its G (float32 [key_dim])."""
  k_ref, v_ref, g_ref = refs
  return k_ref[row, :].astype(jnp.float32), v_ref[row, :].astype(jnp.float32), g_ref[row, :]


def _decay_from_key(g, g_j, j):
  """Vector decay: `e^{G_i - G_j}` [c, key_dim] for query rows i >= j of a sub-chunk, 0 above."""
  rows = jax.lax.broadcasted_iota(jnp.int32, g.shape, 0)
  return jnp.where(rows >= j, jnp.exp(jnp.minimum(g - g_j[None, :], 0.0)), 0.0)


def _states_kernel(k_ref, v_ref, g_ref, init_ref, states_ref, final_ref, *, st):
  """`states_ref[n]` = S_n, the state chunk n starts from; `final_ref` = the state after all."""
  chunk = st.chunk

  def step(n, state):
    start = n * chunk
    _, decay_k, decay_state = _chunk_decays(g_ref, start, chunk, st.vector)
    states_ref[n, :, :] = state
    k, v = _load(k_ref, start, chunk), _load(v_ref, start, chunk)
    update = common.dot(k * decay_k, v, dtype=st.operand_dtype, transpose_a=True)
    return decay_state * state + update

  final_ref[...] = jax.lax.fori_loop(0, k_ref.shape[0] // chunk, step, init_ref[...])


def _state_grads_kernel(q_ref, g_ref, d_out_ref, d_final_ref, d_states_ref, d_init_ref, *, st):
  """`d_states_ref[n]` = the gradient of the state chunk n ends with (S_n+1); `d_init_ref` =
  the gradient of the initial state. A reverse walk over the chunks."""
  chunk = st.chunk
  num_chunks = q_ref.shape[0] // chunk

  def step(i, d_state):
    n = num_chunks - 1 - i
    start = n * chunk
    decay_q, _, decay_state = _chunk_decays(g_ref, start, chunk, st.vector)
    d_states_ref[n, :, :] = d_state
    q, d_out = _load(q_ref, start, chunk), _load(d_out_ref, start, chunk)
    update = common.dot(q * decay_q, d_out, dtype=st.operand_dtype, transpose_a=True)
    return decay_state * d_state + update

  d_init_ref[...] = jax.lax.fori_loop(0, num_chunks, step, d_final_ref[...])


def _output_kernel(q_ref, k_ref, v_ref, g_ref, state_ref, out_ref, *, st):
  """One chunk's output `[C, value_tile]` from the state it starts from."""
  dot = functools.partial(common.dot, dtype=st.operand_dtype)
  state = state_ref[...]
  if not st.vector:
    chunk = st.chunk
    q, k, v, g = _load(q_ref, 0, chunk), _load(k_ref, 0, chunk), _load(v_ref, 0, chunk), g_ref[...]
    scores = dot(q, k, transpose_b=True) * _decay_matrix(g)
    out_ref[...] = dot(q * jnp.exp(g)[:, None], state) + dot(scores, v)
    return
  c = st.sub_chunk
  for a in range(st.chunk // c):
    q, g, r = _load(q_ref, a * c, c), g_ref[_rows(a * c, c), :], g_ref[a * c, :]
    out = dot(q * jnp.exp(g), state)
    q_rel = q * jnp.exp(g - r[None, :])
    for b in range(a):
      k_rel = _load(k_ref, b * c, c) * jnp.exp(r[None, :] - g_ref[_rows(b * c, c), :])
      out = out + dot(dot(q_rel, k_rel, transpose_b=True), _load(v_ref, b * c, c))

    def add_key(j, out, q=q, g=g, start=a * c):
      k_j, v_j, g_j = _key_row((k_ref, v_ref, g_ref), start + j)
      scores = jnp.sum(q * k_j[None, :] * _decay_from_key(g, g_j, j), axis=1)
      return out + scores[:, None] * v_j[None, :]

    out_ref[_rows(a * c, c), :] = jax.lax.fori_loop(0, c, add_key, out)


def _gradients_kernel(
  q_ref, k_ref, v_ref, g_ref, state_ref, d_out_ref, d_state_ref, dq_ref, dk_ref, dv_ref, *, st,
):  # fmt: skip
  """One chunk's dq, dk (partial sums over this value tile) and dv, from the state it starts
  from and the gradient of the state it ends with."""
  dot = functools.partial(common.dot, dtype=st.operand_dtype)
  chunk = st.chunk
  state, d_state = state_ref[...], d_state_ref[...]
  decay_q, decay_k, _ = _chunk_decays(g_ref, 0, chunk, st.vector)
  if not st.vector:
    q, k, v, d_out = (_load(ref, 0, chunk) for ref in (q_ref, k_ref, v_ref, d_out_ref))
    decay_matrix = _decay_matrix(g_ref[...])
    scores = dot(q, k, transpose_b=True) * decay_matrix
    d_scores = dot(d_out, v, transpose_b=True) * decay_matrix
    dq_ref[...] = dot(d_out, state, transpose_b=True) * decay_q + dot(d_scores, k)
    dk_ref[...] = dot(v, d_state, transpose_b=True) * decay_k + dot(d_scores, q, transpose_a=True)
    dv_ref[...] = dot(k * decay_k, d_state) + dot(scores, d_out, transpose_a=True)
    return
  c = st.sub_chunk
  subs = range(chunk // c)
  sub_decay_k = [jnp.exp(g_ref[chunk - 1, :][None, :] - g_ref[_rows(b * c, c), :]) for b in subs]
  dk = [dot(_load(v_ref, b * c, c), d_state, transpose_b=True) * sub_decay_k[b] for b in subs]
  dv = [dot(_load(k_ref, b * c, c) * sub_decay_k[b], d_state) for b in subs]
  for a in subs:
    q, g, r = _load(q_ref, a * c, c), g_ref[_rows(a * c, c), :], g_ref[a * c, :]
    d_out = _load(d_out_ref, a * c, c)
    q_rel = q * jnp.exp(g - r[None, :])
    dq_rel = jnp.zeros_like(q)
    for b in range(a):
      to_r = jnp.exp(r[None, :] - g_ref[_rows(b * c, c), :])
      k_rel = _load(k_ref, b * c, c) * to_r
      scores = dot(q_rel, k_rel, transpose_b=True)
      d_scores = dot(d_out, _load(v_ref, b * c, c), transpose_b=True)
      dq_rel = dq_rel + dot(d_scores, k_rel)
      dk[b] = dk[b] + dot(d_scores, q_rel, transpose_a=True) * to_r
      dv[b] = dv[b] + dot(scores, d_out, transpose_a=True)
    dq = dot(d_out, state, transpose_b=True) * jnp.exp(g) + dq_rel * jnp.exp(g - r[None, :])
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)

    def add_key(j, carry, q=q, g=g, d_out=d_out, start=a * c, rows=rows):
      dq, dk, dv = carry
      k_j, v_j, g_j = _key_row((k_ref, v_ref, g_ref), start + j)
      decay = _decay_from_key(g, g_j, j)
      q_decayed = q * decay
      scores = jnp.sum(q_decayed * k_j[None, :], axis=1)
      d_scores = jnp.sum(d_out * v_j[None, :], axis=1)
      dq = dq + d_scores[:, None] * k_j[None, :] * decay
      is_j = rows == j
      dk_j = jnp.sum(d_scores[:, None] * q_decayed, axis=0)
      dv_j = jnp.sum(scores[:, None] * d_out, axis=0)
      return dq, dk + jnp.where(is_j, dk_j[None, :], 0.0), dv + jnp.where(is_j, dv_j[None, :], 0.0)

    dq, dk[a], dv[a] = jax.lax.fori_loop(0, c, add_key, (dq, dk[a], dv[a]))
    dq_ref[_rows(a * c, c), :] = dq
  for b in subs:
    dk_ref[_rows(b * c, c), :] = dk[b]
    dv_ref[_rows(b * c, c), :] = dv[b]


# ---------------------------------------------------------------------------------------------
# pallas_call wiring. Operands are `[b, h, t, d]`; states `[b, h, chunks, key_dim, value_dim]`.


def _kv_head(st, h):
  return jax.lax.div(h, st.groups)  # lax.div, not //: floor division lowers through `sign`


def _sequence_specs(st, seq, key_dim, num_chunks):
  """BlockSpecs over the state passes' grid (batch, head, value tile): whole sequences."""
  bv = st.block_value
  return dict(
    q=pl.BlockSpec((None, None, seq, key_dim), lambda b, h, j: (b, h, 0, 0)),
    k=pl.BlockSpec((None, None, seq, key_dim), lambda b, h, j: (b, _kv_head(st, h), 0, 0)),
    v=pl.BlockSpec((None, None, seq, bv), lambda b, h, j: (b, _kv_head(st, h), 0, j)),
    g=(
      pl.BlockSpec((None, None, seq, key_dim), lambda b, h, j: (b, h, 0, 0))
      if st.vector
      else pl.BlockSpec((None, None, seq), lambda b, h, j: (b, h, 0))
    ),
    values=pl.BlockSpec((None, None, seq, bv), lambda b, h, j: (b, h, 0, j)),
    state=pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)),
    states=pl.BlockSpec((None, None, num_chunks, key_dim, bv), lambda b, h, j: (b, h, 0, 0, j)),
  )


def _chunk_specs(st, key_dim):
  """BlockSpecs over the chunk passes' grid (batch, head, chunk, value tile): one chunk."""
  c, bv = st.chunk, st.block_value
  return dict(
    q=pl.BlockSpec((None, None, c, key_dim), lambda b, h, n, j: (b, h, n, 0)),
    k=pl.BlockSpec((None, None, c, key_dim), lambda b, h, n, j: (b, _kv_head(st, h), n, 0)),
    v=pl.BlockSpec((None, None, c, bv), lambda b, h, n, j: (b, _kv_head(st, h), n, j)),
    g=(
      pl.BlockSpec((None, None, c, key_dim), lambda b, h, n, j: (b, h, n, 0))
      if st.vector
      else pl.BlockSpec((None, None, c), lambda b, h, n, j: (b, h, n))
    ),
    values=pl.BlockSpec((None, None, c, bv), lambda b, h, n, j: (b, h, n, j)),
    state=pl.BlockSpec((None, None, None, key_dim, bv), lambda b, h, n, j: (b, h, n, 0, j)),
    keys_per_tile=pl.BlockSpec((None, None, None, c, key_dim), lambda b, h, n, j: (b, h, j, n, 0)),
  )


def _chunk_cumsum(log_decay, chunk):
  """Per-token log decay `[b, h, t(, f)]` -> G, its cumulative sum within each chunk."""
  batch, heads, seq = log_decay.shape[:3]
  by_chunk = log_decay.reshape(batch, heads, seq // chunk, chunk, *log_decay.shape[3:])
  return jnp.cumsum(by_chunk, axis=3).reshape(log_decay.shape)


def _states_call(st, k, v, g, initial_state):
  """(every chunk's start state `[b, h, chunks, key_dim, value_dim]`, final state), float32."""
  batch, heads, seq, key_dim = initial_state.shape[0], g.shape[1], k.shape[2], k.shape[3]
  value_dim, num_chunks = v.shape[3], seq // st.chunk
  specs = _sequence_specs(st, seq, key_dim, num_chunks)
  return triton_call(
    st,
    _states_kernel,
    (batch, heads, value_dim // st.block_value),
    [specs["k"], specs["v"], specs["g"], specs["state"]],
    [specs["states"], specs["state"]],
    [
      jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ],
    "chunked_linear_states_gpu",
  )(k, v, g, initial_state)


def _forward_call(st, q, k, v, g, states):
  """out `[b, h, t, value_dim]`, float32, from the chunks' start states."""
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  specs = _chunk_specs(st, key_dim)
  return triton_call(
    st,
    _output_kernel,
    (batch, heads, seq // st.chunk, value_dim // st.block_value),
    [specs["q"], specs["k"], specs["v"], specs["g"], specs["state"]],
    specs["values"],
    jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32),
    "chunked_linear_fwd_gpu",
  )(q, k, v, g, states)


def _backward_call(st, q, k, v, g, initial_state, d_out, d_final):
  """(dq, dk per value tile `[b, h, value_tiles, t, key_dim]`, dv per query head `[b, h, t,
  value_dim]`, d initial_state), float32."""
  batch, heads, seq, key_dim = q.shape
  value_dim, num_chunks = v.shape[3], seq // st.chunk
  value_tiles = value_dim // st.block_value
  states, _ = _states_call(st, k, v, g, initial_state)
  specs = _sequence_specs(st, seq, key_dim, num_chunks)
  d_states, d_init = triton_call(
    st,
    _state_grads_kernel,
    (batch, heads, value_tiles),
    [specs["q"], specs["g"], specs["values"], specs["state"]],
    [specs["states"], specs["state"]],
    [jax.ShapeDtypeStruct(states.shape, jnp.float32),
     jax.ShapeDtypeStruct(initial_state.shape, jnp.float32)],
    "chunked_linear_state_grads_gpu",
  )(q, g, d_out, d_final)  # fmt: skip
  specs = _chunk_specs(st, key_dim)
  per_tile = jax.ShapeDtypeStruct((batch, heads, value_tiles, seq, key_dim), jnp.float32)
  dq, dk, dv = triton_call(
    st,
    _gradients_kernel,
    (batch, heads, num_chunks, value_tiles),
    [specs["q"], specs["k"], specs["v"], specs["g"], specs["state"], specs["values"],
     specs["state"]],
    [specs["keys_per_tile"], specs["keys_per_tile"], specs["values"]],
    [per_tile, per_tile, jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32)],
    "chunked_linear_bwd_gpu",
  )(q, k, v, g, states, d_out, d_states)  # fmt: skip
  return dq, dk, dv, d_init


# ---------------------------------------------------------------------------------------------
# The public function.


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  log_decay: jax.Array,
  initial_state: jax.Array,
  causal: bool = True,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Decayed linear attention; equals `attnjax.ops.linear.reference.linear_attention`.

  Args:
    q: `[batch, seq, heads, key_dim]` (feature-mapped, scaled queries).
    k: `[batch, seq, kv_heads, key_dim]`, `heads % kv_heads == 0`.
    v: `[batch, seq, kv_heads, value_dim]`.
    log_decay: float32 `[batch, seq, heads, 1]` (one decay per token and head; a constant
      per head or no decay are broadcast to it) or `[batch, seq, heads, key_dim]` (per key
      channel, GLA), log of the decay (<= 0).
    initial_state: float32 `[batch, heads, key_dim, value_dim]`.
    causal: False: every token reads the final state (bidirectional).
    block_sizes: tiles and launch parameters (default `default_block_sizes`); the sequence is
      zero-padded to a multiple of the chunk, head dims to powers of two >= 16.
    interpret: run the kernels in the Pallas interpreter (any backend, e.g. CPU).

  Returns:
    (`out [batch, seq, heads, value_dim]`, `final_state [batch, heads, key_dim, value_dim]`),
    float32.
  """
  check_shapes(q, k, v, log_decay, initial_state)
  block_sizes = block_sizes or default_block_sizes(q.shape[3])
  triton.check_head_dims(interpret=interpret, key_dim=q.shape[3], value_dim=v.shape[3])
  batch, seq, heads, key_dim = q.shape
  kv_heads, value_dim = k.shape[2], v.shape[3]
  chunk = block_sizes.chunk
  seq_pad = -(-seq // chunk) * chunk
  key_pad = common.next_power_of_two(key_dim, at_least=MIN_DOT)
  value_pad = common.next_power_of_two(value_dim, at_least=MIN_DOT)
  vector = log_decay.shape[3] > 1
  st = _Static(
    chunk=chunk,
    sub_chunk=block_sizes.sub_chunk,
    block_value=min(block_sizes.block_value, value_pad),
    groups=heads // kv_heads,
    vector=vector,
    operand_dtype=jnp.dtype(jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16),
    interpret=bool(interpret),
    num_warps=block_sizes.num_warps,
    num_stages=block_sizes.num_stages,
  )

  def to_kernel_layout(x, width):  # [b, t, h, d] -> [b, h, t_pad, width]
    x = jnp.pad(x, ((0, 0), (0, seq_pad - seq), (0, 0), (0, width - x.shape[3])))
    return x.transpose(0, 2, 1, 3)

  g = to_kernel_layout(log_decay.astype(jnp.float32), key_pad if vector else 1)
  state_pad = ((0, 0), (0, 0), (0, key_pad - key_dim), (0, value_pad - value_dim))
  out, final_state = _chunked(
    st,
    to_kernel_layout(q, key_pad),
    to_kernel_layout(k, key_pad),
    to_kernel_layout(v, value_pad),
    g if vector else g[..., 0],
    jnp.pad(initial_state.astype(jnp.float32), state_pad),
  )
  final_state = final_state[:, :, :key_dim, :value_dim]
  if not causal:
    return jnp.einsum("bthf,bhfv->bthv", q.astype(jnp.float32), final_state), final_state
  return out.transpose(0, 2, 1, 3)[:, :seq, :, :value_dim], final_state


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, q, k, v, log_decay, initial_state):
  g = _chunk_cumsum(log_decay, st.chunk)
  states, final_state = _states_call(st, k, v, g, initial_state)
  out = _forward_call(st, q, k, v, g, states)
  return (out, final_state), (q, k, v, log_decay, initial_state, final_state)


def _backward(st, residuals, cotangents):
  q, k, v, log_decay, initial_state, final_state = residuals
  d_out, d_final = cotangents
  d_final = d_final.astype(jnp.float32)
  g = _chunk_cumsum(log_decay, st.chunk)
  dq_tiles, dk_tiles, dv, d_init = _backward_call(
    st, q, k, v, g, initial_state, d_out.astype(jnp.float32), d_final
  )
  dq, dk = dq_tiles.sum(axis=2), dk_tiles.sum(axis=2)  # dk per query head
  # dB_t = q_t dq_t - k_t dk_t (+ <dS_T, S_T> on the last token); d log_decay_s = sum_{t>=s} dB_t.
  k_per_head = jnp.repeat(k, st.groups, axis=1).astype(jnp.float32)
  d_cumulative = q.astype(jnp.float32) * dq - k_per_head * dk
  through_final = jnp.sum(d_final * final_state, axis=3)
  d_cumulative = d_cumulative.at[:, :, q.shape[2] - 1].add(through_final)
  if not st.vector:
    d_cumulative = jnp.sum(d_cumulative, axis=3)
  d_log_decay = jax.lax.cumsum(d_cumulative, axis=2, reverse=True)
  kv_heads = k.shape[1]
  return (
    dq.astype(q.dtype),
    sum_groups(dk, kv_heads).astype(k.dtype),
    sum_groups(dv, kv_heads).astype(v.dtype),
    d_log_decay,
    d_init,
  )


_chunked = common.custom_vjp(_forward, _backward)
