"""Chunked linear attention for GPUs (Pallas, Triton backend; Lightning Attention-2 tiling).

Same function and signature as `tpu.linear_attention`, and equal to
`attnjax.ops.linear.reference.linear_attention`. Qin et al. 2024, "Lightning Attention-2: A Free
Lunch for Handling Unlimited Sequence Lengths in Large Language Models" (arXiv 2401.04658).

Tiling: one program per (batch, query head, tile of value columns) walks the chunks of C
tokens in order, carrying the running state `S [key_dim, value_tile]` in registers (float32,
a `fori_loop` carry). Value columns never mix (`o_i = q_i S`, `S += k^T v`), so the value tiles
are independent programs. With `G_i` the cumulative log decay from the chunk start to token i
(chunk-relative, so every exponent below is <= 0 and nothing overflows for any sequence length):

    o_i = (q_i e^{G_i}) S + sum_{j <= i} (q_i e^{G_i - G_j}) . k_j v_j
    S'  = e^{G_C} S + sum_j (k_j e^{G_C - G_j})^T v_j

A decay per token and head (`log_decay [batch, seq, heads, 1]`) gives the [C, C] scores by one
tensor-core matmul times a decay matrix. A decay per key channel (GLA, `[..., key_dim]`) makes
each score a sum of differently decayed products; the kernel then walks the keys j of the chunk
and adds the column `e^{G - G_j}`-weighted scores times `v_j` to a [C, value_tile] carry,
exactly and without the overflow-prone `k e^{-G}` factorization.

Backward: nothing per chunk is stored. One program first walks the chunks forward recomputing
S to get dq, then walks them in reverse carrying dS (the state's gradient) for dk, dv and the
initial state's gradient. The decay gradient needs no kernel: with `B_t` the cumulative log
decay from the sequence start, the function depends on B only through `q_t e^{B_t}`,
`k_t e^{-B_t}` and the final state's factor `e^{B_T}`, so
`dB_t = q_t dq_t - k_t dk_t (+ <dS_T, S_T> at t = T)` and `d log_decay` is its reverse
cumulative sum. Partial dq/dk sums over value tiles and over the query heads of a GQA group are
added outside the kernel.

Why Triton rather than Mosaic GPU: this is a sequential scan with a register-resident state
and small [C, C] tiles, which Triton lowers on every GPU that JAX supports; Mosaic GPU targets
Hopper+ warpgroup pipelines that pay off for large matmuls, not for this recurrence. Triton
needs power-of-two tiles of at least 16 (`tl.dot`), so head dims are zero-padded to a power of
two >= 16 and the sequence to a multiple of C: a zero key or value adds nothing to the state, a
zero query reads nothing, a zero log decay on padded tokens keeps the state as it is, and the
padded rows and columns are sliced off (so padding does not change the function).

float32 inputs follow `jax.default_matmul_precision` (`kernels_pallas.triton`: TF32 by default
on hardware, IEEE float32 under "highest", which the 1e-4 float32 tolerance needs);
16-bit inputs feed bfloat16 matmul operands (float32's range: the state may outgrow float16's)
to the tensor cores with float32 accumulation. Decays, the vector path's scores, the state and
all outputs are float32.
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
    block_value: value columns per program (a power of two >= 16; capped at the padded
      value dim). Smaller tiles mean more programs and fewer registers per program.
    num_warps: warps per program (a power of two, 1 to 32).
    num_stages: Triton software-pipelining stages of the chunk loop (>= 1).
  """

  chunk: int = 64
  block_value: int = 64
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    for name in ("chunk", "block_value"):
      value = getattr(self, name)
      if not common.is_power_of_two(value) or value < MIN_DOT:
        raise ValueError(f"{name} must be a power of two >= {MIN_DOT}, got {name}={value}")
    if not common.is_power_of_two(self.num_warps) or self.num_warps > 32:
      raise ValueError(f"num_warps must be a power of two in [1, 32], got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


WIDE_ROW_TILE = 32


def default_block_sizes(key_dim: int, dtype, chunk: int = BlockSizes.chunk) -> BlockSizes:
  """`BlockSizes(chunk)`, with at most `WIDE_ROW_TILE` tokens per chunk and value columns per
  program where a padded `[C, key_dim]` row is wider than `triton.WIDE_ROW_BYTES` (key_dim 256
  in float32): at 64 and 64 the IEEE float32 dots ask an A100 for 213 KB (forward) and 295 KB
  (backward) of its 163 KB of shared memory, and at 32 tokens still 180 KB (backward)."""
  row_bytes = common.next_power_of_two(key_dim, at_least=MIN_DOT) * jnp.dtype(dtype).itemsize
  if row_bytes > triton.WIDE_ROW_BYTES:
    return BlockSizes(chunk=min(chunk, WIDE_ROW_TILE), block_value=WIDE_ROW_TILE)
  return BlockSizes(chunk=chunk)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  chunk: int
  block_value: int
  groups: int  # query heads per kv head
  vector: bool  # one log decay per key channel (else one per token and head)
  operand_dtype: jnp.dtype  # of the matmul operands
  interpret: bool
  num_warps: int
  num_stages: int


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _load_chunk(refs, n, chunk, vector):
  """Chunk n of q, k, v (float32 [C, d]) and its decays.

  Returns (q, k, v, g, decay_q, decay_k, decay_state): `g` = G, `[C, key_dim]` for the vector
  decay, else `[C]`; `decay_q = e^{G_i}` and `decay_k = e^{G_C - G_j}` as `[C, key_dim | 1]`;
  `decay_state = e^{G_C}`, a column `[key_dim, 1]` for the vector decay, else a scalar.
  """
  q_ref, k_ref, v_ref, g_ref = refs
  start = pl.multiple_of(n * chunk, chunk)
  tokens = pl.ds(start, chunk)
  q, k, v = (ref[tokens, :].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref))
  if vector:
    g, g_last = g_ref[tokens, :], g_ref[start + chunk - 1, :]
    return q, k, v, g, jnp.exp(g), jnp.exp(g_last[None, :] - g), jnp.exp(g_last)[:, None]
  g, g_last = g_ref[tokens], g_ref[start + chunk - 1]
  return q, k, v, g, jnp.exp(g)[:, None], jnp.exp(g_last - g)[:, None], jnp.exp(g_last)


def _decay_matrix(g):
  """Scalar decay, `g` = G [C]: `D_ij = e^{G_i - G_j}` for j <= i, else 0 ([C, C])."""
  chunk = g.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return jnp.where(rows >= cols, jnp.exp(jnp.minimum(g[:, None] - g[None, :], 0.0)), 0.0)


def _key_row(refs, start, j):
  """Token `start + j` of k, v (float32 [key_dim], [value_tile]) and its G (float32 [key_dim])."""
  k_ref, v_ref, g_ref = refs
  row = start + j
  return (
    k_ref[row, :].astype(jnp.float32),
    v_ref[row, :].astype(jnp.float32),
    g_ref[row, :],
  )


def _decay_from_key(g, g_j, j):
  """Vector decay: `e^{G_i - G_j}` [C, key_dim] for query rows i >= j of the chunk, 0 above."""
  rows = jax.lax.broadcasted_iota(jnp.int32, g.shape, 0)
  return jnp.where(rows >= j, jnp.exp(jnp.minimum(g - g_j[None, :], 0.0)), 0.0)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, init_ref, out_ref, final_ref, *, st):
  chunk = st.chunk
  dot = functools.partial(common.dot, dtype=st.operand_dtype)

  def step(n, state):
    q, k, v, g, decay_q, decay_k, decay_state = _load_chunk(
      (q_ref, k_ref, v_ref, g_ref), n, chunk, st.vector
    )
    out = dot(q * decay_q, state)
    if st.vector:
      start = n * chunk

      def add_key(j, out):
        k_j, v_j, g_j = _key_row((k_ref, v_ref, g_ref), start, j)
        scores = jnp.sum(q * k_j[None, :] * _decay_from_key(g, g_j, j), axis=1)
        return out + scores[:, None] * v_j[None, :]

      out = jax.lax.fori_loop(0, chunk, add_key, out)
    else:
      scores = dot(q, k, transpose_b=True) * _decay_matrix(g)
      out = out + dot(scores, v)
    out_ref[pl.ds(pl.multiple_of(n * chunk, chunk), chunk), :] = out
    return decay_state * state + dot(k * decay_k, v, transpose_a=True)

  num_chunks = q_ref.shape[0] // chunk
  final_ref[...] = jax.lax.fori_loop(0, num_chunks, step, init_ref[...])


def _backward_kernel(
  q_ref, k_ref, v_ref, g_ref, init_ref, d_out_ref, d_final_ref, dq_ref, dk_ref, dv_ref,
  d_init_ref, *, st,
):  # fmt: skip
  chunk = st.chunk
  num_chunks = q_ref.shape[0] // chunk
  refs = (q_ref, k_ref, v_ref, g_ref)
  dot = functools.partial(common.dot, dtype=st.operand_dtype)

  def d_out_of(n):
    return d_out_ref[pl.ds(pl.multiple_of(n * chunk, chunk), chunk), :]

  def dq_step(n, state):  # forward walk, recomputing the state each chunk starts from
    q, k, v, g, decay_q, decay_k, decay_state = _load_chunk(refs, n, chunk, st.vector)
    d_out = d_out_of(n)
    dq = dot(d_out, state, transpose_b=True) * decay_q
    if st.vector:
      start = n * chunk

      def add_key(j, dq):
        k_j, v_j, g_j = _key_row((k_ref, v_ref, g_ref), start, j)
        d_scores = jnp.sum(d_out * v_j[None, :], axis=1)
        return dq + d_scores[:, None] * k_j[None, :] * _decay_from_key(g, g_j, j)

      dq = jax.lax.fori_loop(0, chunk, add_key, dq)
    else:
      d_scores = dot(d_out, v, transpose_b=True) * _decay_matrix(g)
      dq = dq + dot(d_scores, k)
    dq_ref[pl.ds(pl.multiple_of(n * chunk, chunk), chunk), :] = dq
    return decay_state * state + dot(k * decay_k, v, transpose_a=True)

  def dkv_step(step, d_state):  # reverse walk; d_state is the gradient of the chunk's S'
    n = num_chunks - 1 - step
    q, k, v, g, decay_q, decay_k, decay_state = _load_chunk(refs, n, chunk, st.vector)
    d_out = d_out_of(n)
    dk = dot(v, d_state, transpose_b=True) * decay_k
    dv = dot(k * decay_k, d_state)
    if st.vector:
      start = n * chunk
      rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)

      def add_key(j, carry):
        dk, dv = carry
        k_j, v_j, g_j = _key_row((k_ref, v_ref, g_ref), start, j)
        q_decayed = q * _decay_from_key(g, g_j, j)
        scores = jnp.sum(q_decayed * k_j[None, :], axis=1)
        d_scores = jnp.sum(d_out * v_j[None, :], axis=1)
        dk_j = jnp.sum(d_scores[:, None] * q_decayed, axis=0)
        dv_j = jnp.sum(scores[:, None] * d_out, axis=0)
        is_j = rows == j
        return dk + jnp.where(is_j, dk_j[None, :], 0.0), dv + jnp.where(is_j, dv_j[None, :], 0.0)

      dk, dv = jax.lax.fori_loop(0, chunk, add_key, (dk, dv))
    else:
      decay_matrix = _decay_matrix(g)
      scores = dot(q, k, transpose_b=True) * decay_matrix
      d_scores = dot(d_out, v, transpose_b=True) * decay_matrix
      dk = dk + dot(d_scores, q, transpose_a=True)
      dv = dv + dot(scores, d_out, transpose_a=True)
    tokens = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    dk_ref[tokens, :] = dk
    dv_ref[tokens, :] = dv
    return decay_state * d_state + dot(q * decay_q, d_out, transpose_a=True)

  jax.lax.fori_loop(0, num_chunks, dq_step, init_ref[...])
  d_init_ref[...] = jax.lax.fori_loop(0, num_chunks, dkv_step, d_final_ref[...])


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _specs(st, seq, key_dim):
  """BlockSpecs over the grid (batch, head, value tile) of the `[b, h, t, d]` operands."""

  def kv_head(h):
    # lax.div, not //: floor division lowers through `sign`.
    return jax.lax.div(h, st.groups)

  bv = st.block_value
  decay = (
    pl.BlockSpec((None, None, seq, key_dim), lambda b, h, j: (b, h, 0, 0))
    if st.vector
    else pl.BlockSpec((None, None, seq), lambda b, h, j: (b, h, 0))
  )
  return dict(
    q=pl.BlockSpec((None, None, seq, key_dim), lambda b, h, j: (b, h, 0, 0)),
    k=pl.BlockSpec((None, None, seq, key_dim), lambda b, h, j: (b, kv_head(h), 0, 0)),
    v=pl.BlockSpec((None, None, seq, bv), lambda b, h, j: (b, kv_head(h), 0, j)),
    g=decay,
    state=pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)),
    values=pl.BlockSpec((None, None, seq, bv), lambda b, h, j: (b, h, 0, j)),
    keys_per_tile=pl.BlockSpec((None, None, None, seq, key_dim), lambda b, h, j: (b, h, j, 0, 0)),
  )


def _chunk_cumsum(log_decay, chunk):
  """Per-token log decay `[b, h, t(, f)]` -> G, its cumulative sum within each chunk."""
  batch, heads, seq = log_decay.shape[:3]
  by_chunk = log_decay.reshape(batch, heads, seq // chunk, chunk, *log_decay.shape[3:])
  return jnp.cumsum(by_chunk, axis=3).reshape(log_decay.shape)


def _forward_call(st, q, k, v, log_decay, initial_state):
  """(out `[b, h, t, value_dim]`, final state `[b, h, key_dim, value_dim]`), float32."""
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  specs = _specs(st, seq, key_dim)
  state_shape = jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)
  return triton_call(
    st,
    _forward_kernel,
    (batch, heads, value_dim // st.block_value),
    [specs["q"], specs["k"], specs["v"], specs["g"], specs["state"]],
    [specs["values"], specs["state"]],
    [jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32), state_shape],
    "chunked_linear_fwd_gpu",
  )(q, k, v, _chunk_cumsum(log_decay, st.chunk), initial_state)


def _backward_call(st, q, k, v, log_decay, initial_state, d_out, d_final):
  """(dq, dk per value tile `[b, h, value_tiles, t, key_dim]`, dv per query head `[b, h, t,
  value_dim]`, d initial_state), float32."""
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  value_tiles = value_dim // st.block_value
  specs = _specs(st, seq, key_dim)
  per_tile = jax.ShapeDtypeStruct((batch, heads, value_tiles, seq, key_dim), jnp.float32)
  return triton_call(
    st,
    _backward_kernel,
    (batch, heads, value_tiles),
    [specs["q"], specs["k"], specs["v"], specs["g"], specs["state"], specs["values"],
     specs["state"]],
    [specs["keys_per_tile"], specs["keys_per_tile"], specs["values"], specs["state"]],
    [per_tile, per_tile, jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32),
     jax.ShapeDtypeStruct(initial_state.shape, jnp.float32)],
    "chunked_linear_bwd_gpu",
  )(q, k, v, _chunk_cumsum(log_decay, st.chunk), initial_state, d_out, d_final)  # fmt: skip


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
  block_sizes = block_sizes or default_block_sizes(q.shape[3], q.dtype)
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
  out, final_state = _forward_call(st, q, k, v, log_decay, initial_state)
  return (out, final_state), (q, k, v, log_decay, initial_state, final_state)


def _backward(st, residuals, cotangents):
  q, k, v, log_decay, initial_state, final_state = residuals
  d_out, d_final = cotangents
  d_final = d_final.astype(jnp.float32)
  dq_tiles, dk_tiles, dv, d_init = _backward_call(
    st, q, k, v, log_decay, initial_state, d_out.astype(jnp.float32), d_final
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
