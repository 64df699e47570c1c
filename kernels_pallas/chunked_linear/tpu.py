"""Chunked linear attention as a Pallas TPU kernel (Lightning Attention-2 tiling).

Qin et al. 2024, "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths
in Large Language Models" (arXiv 2401.04658): the sequence is tiled into chunks of C tokens;
within a chunk the output is decayed causal attention on a [C, C] tile, across chunks it flows
through the running state `[key_dim, value_dim]` kept in VMEM scratch while the grid walks the
chunks of one (batch, head) in order. With `G_i` the cumulative log decay from the chunk start
to token i (so every exponent below is <= 0):

    o_i = (q_i e^{G_i}) S + sum_{j <= i} (q_i e^{G_i - G_j}) . k_j v_j
    S'  = e^{G_C} S + sum_j (k_j e^{G_C - G_j})^T v_j

Decay kinds: one log decay per token and head (`log_decay [batch, seq, heads, 1]`; a constant
per head is broadcast to it) uses the MXU for the [C, C] scores; a decay per key channel (GLA,
`[batch, seq, heads, key_dim]`) builds the scores one query row at a time from [C, key_dim]
tiles, exactly, without the overflow-prone `k e^{-G}` factorization.

The backward kernel walks the chunks in reverse carrying dS, the gradient of the state, and
gets the decay gradient from the identity dG_i = q_i * dq_i - k_i * dk_i (+ <dS', S'> on the
chunk's last token), which holds because G enters only through q e^{G}, k e^{-G} and e^{G_C}.

Computation is float32 in VMEM for float32 and bfloat16 inputs. Layout
`[batch, seq, heads, dim]`, GQA by shape, like its reference
`attnjax.ops.linear.reference.linear_attention`, which it must equal.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas.chunked_linear.common import check_shapes, sum_groups

CHUNK_MULTIPLE = 16  # chunk granularity that tiles both float32 (8) and bfloat16 (16) sublanes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per chunk: the [C, C] intra-chunk tile and the state-update granularity."""

  chunk: int = 64

  def __post_init__(self):
    if self.chunk < CHUNK_MULTIPLE or self.chunk % CHUNK_MULTIPLE:
      raise ValueError(f"chunk must be a positive multiple of {CHUNK_MULTIPLE}, got {self.chunk}")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  chunk: int
  vector: bool  # one log decay per key channel (else one per token and head)
  interpret: bool | pltpu.InterpretParams


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _dot(a, b, *, transpose_a=False, transpose_b=False):
  """float32 matmul of 2-D tiles with optional transposes (no data movement)."""
  contract = (0 if transpose_a else 1, 1 if transpose_b else 0)
  return jax.lax.dot_general(
    a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=jnp.float32
  )


def _chunk_decays(g, g_last_col):
  """`g` = G [C, f'] -> (e^{G_i} [C, f'], e^{G_C - G_j} [C, f'], e^{G_C} as a column [f', 1])."""
  g_last_row = g[g.shape[0] - 1 :, :]
  return jnp.exp(g), jnp.exp(g_last_row - g), jnp.exp(g_last_col)


def _decay_matrix(g_col, g_row):
  """Scalar decay: `D_ij = e^{G_i - G_j}` for j <= i, else 0, from G `[C, 1]` and `[1, C]`."""
  chunk = g_col.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return jnp.exp(jnp.where(rows >= cols, g_col - g_row, -jnp.inf))


def _row_decays(g_ref, i, g):
  """Vector decay, query row i: (`e^{G_i - G_j}` [C, f] clipped at 1 where j > i, j <= i [C, 1])."""
  decay = jnp.exp(jnp.minimum(g_ref[pl.ds(i, 1), :] - g, 0.0))
  return decay, jax.lax.broadcasted_iota(jnp.int32, (g.shape[0], 1), 0) <= i


def _forward_kernel(*refs, st):
  q_ref, k_ref, v_ref, g_ref, init_ref, g_last_ref, *rest = refs
  g_row_ref = None if st.vector else rest.pop(0)  # G as rows, for the scalar decay matrix
  out_ref, states_ref, final_ref, state = rest
  chunk_index = pl.program_id(2)

  @pl.when(chunk_index == 0)
  def _():
    state[...] = init_ref[...]

  q = q_ref[...].astype(jnp.float32)
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  g = g_ref[...]
  decay_q, decay_k, decay_state = _chunk_decays(g, g_last_ref[...])
  state_before = state[...]
  states_ref[...] = state_before
  inter = _dot(q * decay_q, state_before)
  if st.vector:
    # Per-channel decay makes each score a sum over channels of differently decayed
    # products, so scores are built one query row at a time: [C, f] tiles, no [C, C, f].
    out_ref[...] = inter

    def add_row(i, carry):
      decay, visible = _row_decays(g_ref, i, g)
      scores = jnp.where(visible, jnp.sum(q_ref[pl.ds(i, 1), :] * k * decay, 1, keepdims=True), 0.0)
      out_ref[pl.ds(i, 1), :] += jnp.sum(scores * v, axis=0, keepdims=True)
      return carry

    jax.lax.fori_loop(0, g.shape[0], add_row, 0)
  else:
    scores = _dot(q, k, transpose_b=True) * _decay_matrix(g, g_row_ref[...])
    out_ref[...] = inter + _dot(scores, v)
  state[...] = decay_state * state_before + _dot(k * decay_k, v, transpose_a=True)

  @pl.when(chunk_index == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = state[...]


def _backward_kernel(*refs, st):
  q_ref, k_ref, v_ref, g_ref, states_ref, d_out_ref, d_final_ref, g_last_ref, *rest = refs
  g_row_ref = None if st.vector else rest.pop(0)
  dq_ref, dk_ref, dv_ref, dg_ref, d_init_ref, d_state = rest
  step = pl.program_id(2)  # chunks are visited last to first

  @pl.when(step == 0)
  def _():
    d_state[...] = d_final_ref[...]

  q = q_ref[...].astype(jnp.float32)
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  d_out = d_out_ref[...]
  g = g_ref[...]
  decay_q, decay_k, decay_state = _chunk_decays(g, g_last_ref[...])
  state_before, d_state_after = states_ref[...], d_state[...]
  k_to_end = k * decay_k
  # Through the state: o_i += (q_i e^{G_i}) S and S' += (k_j e^{G_C - G_j})^T v_j.
  dq = _dot(d_out, state_before, transpose_b=True) * decay_q
  dk = _dot(v, d_state_after, transpose_b=True) * decay_k
  dv = _dot(k_to_end, d_state_after)
  if st.vector:
    dq_ref[...] = dq

    def add_row(i, carry):
      dk, dv = carry
      decay, visible = _row_decays(g_ref, i, g)
      q_i, d_out_i = q_ref[pl.ds(i, 1), :], d_out_ref[pl.ds(i, 1), :]
      scores = jnp.where(visible, jnp.sum(q_i * k * decay, axis=1, keepdims=True), 0.0)
      d_scores = jnp.where(visible, jnp.sum(d_out_i * v, axis=1, keepdims=True), 0.0)
      dq_ref[pl.ds(i, 1), :] += jnp.sum(d_scores * k * decay, axis=0, keepdims=True)
      return dk + d_scores * q_i * decay, dv + scores * d_out_i

    dk, dv = jax.lax.fori_loop(0, g.shape[0], add_row, (dk, dv))
    dq = dq_ref[...]
  else:
    decay_matrix = _decay_matrix(g, g_row_ref[...])
    scores = _dot(q, k, transpose_b=True) * decay_matrix
    d_scores = _dot(d_out, v, transpose_b=True) * decay_matrix
    dq = dq + _dot(d_scores, k)
    dk = dk + _dot(d_scores, q, transpose_a=True)
    dv = dv + _dot(scores, d_out, transpose_a=True)
    dq_ref[...] = dq
  dk_ref[...] = dk
  dv_ref[...] = dv
  state_after = decay_state * state_before + _dot(k_to_end, v, transpose_a=True)
  # <dS', S'> per key channel, as a row [1, f]: the explicit e^{G_C} factor of S'.
  ones = jnp.ones((1, state_after.shape[1]), jnp.float32)
  through_state = _dot(ones, d_state_after * state_after, transpose_b=True)
  is_last = jax.lax.broadcasted_iota(jnp.int32, (g.shape[0], 1), 0) == g.shape[0] - 1
  d_g = q * dq - k * dk + jnp.where(is_last, through_state, 0.0)
  dg_ref[...] = d_g if st.vector else jnp.sum(d_g, axis=1, keepdims=True)
  d_state[...] = decay_state * d_state_after + _dot(q * decay_q, d_out, transpose_a=True)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    d_init_ref[...] = d_state[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _specs(q, k, v, g, chunk, *, reverse):
  """BlockSpecs of the [b, h, t, d]-layout operands, walking chunks forward or in reverse."""
  heads, seq, key_dim = q.shape[1:]
  groups, value_dim, decay_dim = heads // k.shape[1], v.shape[3], g.shape[3]
  num_chunks = seq // chunk

  def chunk_of(n):
    return num_chunks - 1 - n if reverse else n

  def tokens(dim, per_kv_head=False):
    # lax.div, not //: floor division lowers through `sign`, which Mosaic cannot lower off-TPU.
    head = (lambda h: jax.lax.div(h, groups)) if per_kv_head else (lambda h: h)
    return pl.BlockSpec((None, None, chunk, dim), lambda b, h, n: (b, head(h), chunk_of(n), 0))

  def per_chunk(rows, cols):
    return pl.BlockSpec((None, None, None, rows, cols), lambda b, h, n: (b, h, chunk_of(n), 0, 0))

  return dict(
    q=tokens(key_dim),
    k=tokens(key_dim, per_kv_head=True),
    v=tokens(value_dim, per_kv_head=True),
    v_sized=tokens(value_dim),
    g=tokens(decay_dim),
    g_last=per_chunk(decay_dim, 1),
    g_row=per_chunk(1, chunk),
    states=per_chunk(key_dim, value_dim),
    state=pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, n: (b, h, 0, 0)),
  )


def _decay_operands(g, chunk):
  """(G_C of each chunk as a column [b, h, n, f', 1], G as rows [b, h, n, 1, C] if scalar)."""
  batch, heads, seq, decay_dim = g.shape
  by_chunk = g.reshape(batch, heads, seq // chunk, chunk, decay_dim)
  g_last = by_chunk[:, :, :, -1, :, None]
  return (g_last,) if decay_dim > 1 else (g_last, by_chunk.transpose(0, 1, 2, 4, 3))


def _tpu_call(st, kernel, *, grid, in_specs, out_specs, out_shape, scratch, name):
  return pl.pallas_call(
    functools.partial(kernel, st=st),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=[pltpu.VMEM(scratch, jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=st.interpret,
    name=name,
  )


def _forward_call(st, q, k, v, g, initial_state):
  """`[b, h, t, d]` operands, `g` the chunk-local cumulative log decay `[b, h, t, 1 | f]`.

  Returns (out, the state before every chunk `[b, h, n, key_dim, value_dim]`, final state).
  """
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  specs = _specs(q, k, v, g, st.chunk, reverse=False)
  decay_specs = [specs["g_last"]] if st.vector else [specs["g_last"], specs["g_row"]]
  return _tpu_call(
    st,
    _forward_kernel,
    grid=(batch, heads, seq // st.chunk),
    in_specs=[specs["q"], specs["k"], specs["v"], specs["g"], specs["state"], *decay_specs],
    out_specs=[specs["v_sized"], specs["states"], specs["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, seq // st.chunk, key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ],
    scratch=(key_dim, value_dim),
    name="chunked_linear_fwd",
  )(q, k, v, g, initial_state, *_decay_operands(g, st.chunk))


def _backward_call(st, q, k, v, g, states, d_out, d_final):
  """(dq, dk per query head, dv per query head, dg, d initial_state), all float32."""
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  specs = _specs(q, k, v, g, st.chunk, reverse=True)
  decay_specs = [specs["g_last"]] if st.vector else [specs["g_last"], specs["g_row"]]
  return _tpu_call(
    st,
    _backward_kernel,
    grid=(batch, heads, seq // st.chunk),
    in_specs=[
      specs["q"],
      specs["k"],
      specs["v"],
      specs["g"],
      specs["states"],
      specs["v_sized"],
      specs["state"],
      *decay_specs,
    ],  # fmt: skip
    out_specs=[specs["q"], specs["q"], specs["v_sized"], specs["g"], specs["state"]],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, jnp.float32),
      jax.ShapeDtypeStruct(q.shape, jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32),
      jax.ShapeDtypeStruct(g.shape, jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ],
    scratch=(key_dim, value_dim),
    name="chunked_linear_bwd",
  )(q, k, v, g, states, d_out, d_final, *_decay_operands(g, st.chunk))


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
  interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
  """Decayed linear attention; equals `attnjax.ops.linear.reference.linear_attention`.

  Args:
    q: `[batch, seq, heads, key_dim]` (feature-mapped, scaled queries).
    k: `[batch, seq, kv_heads, key_dim]`, `heads % kv_heads == 0`.
    v: `[batch, seq, kv_heads, value_dim]`.
    log_decay: float32 `[batch, seq, heads, 1]` (one decay per token and head) or
      `[batch, seq, heads, key_dim]` (per key channel, GLA), log of the decay (<= 0).
    initial_state: float32 `[batch, heads, key_dim, value_dim]`.
    causal: False: every token reads the final state (bidirectional).
    block_sizes: chunk size (default `BlockSizes()`); the sequence is zero-padded to a
      multiple of it.
    interpret: run the kernels in the Pallas interpreter (CPU); `pltpu.InterpretParams()`
      selects the TPU interpreter, which also checks for races and out-of-bounds blocks.

  Returns:
    (`out [batch, seq, heads, value_dim]`, `final_state [batch, heads, key_dim, value_dim]`),
    float32.
  """
  block_sizes = block_sizes or BlockSizes()
  check_shapes(q, k, v, log_decay, initial_state)
  batch, seq, heads, _ = q.shape
  chunk = block_sizes.chunk
  padded = -(-seq // chunk) * chunk
  pad = [(0, 0), (0, padded - seq), (0, 0), (0, 0)]
  vector = log_decay.shape[3] > 1

  def to_kernel_layout(x):  # [b, t, h, d] -> [b, h, t_padded, d]
    # Vector decay reads single query rows, which needs unpacked 32-bit rows.
    x = x.astype(jnp.float32) if vector else x
    return jnp.pad(x, pad).transpose(0, 2, 1, 3)

  g = jnp.pad(log_decay.astype(jnp.float32), pad)
  g = jnp.cumsum(g.reshape(batch, padded // chunk, chunk, heads, -1), axis=2)
  g = g.reshape(batch, padded, heads, -1).transpose(0, 2, 1, 3)
  st = _Static(chunk=chunk, vector=vector, interpret=interpret)
  out, final_state = _chunked(
    st,
    to_kernel_layout(q),
    to_kernel_layout(k),
    to_kernel_layout(v),
    g,
    initial_state.astype(jnp.float32),
  )
  if not causal:
    return jnp.einsum("bthf,bhfv->bthv", q.astype(jnp.float32), final_state), final_state
  return out.transpose(0, 2, 1, 3)[:, :seq], final_state


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, q, k, v, g, initial_state):
  out, states, final_state = _forward_call(st, q, k, v, g, initial_state)
  return (out, final_state), (q, k, v, g, initial_state, states)


def _backward(st, residuals, cotangents):
  q, k, v, g, initial_state, states = residuals
  d_out, d_final = cotangents
  dq, dk, dv, dg, d_init = _backward_call(
    st, q, k, v, g, states, d_out.astype(jnp.float32), d_final.astype(jnp.float32)
  )
  kv_heads = k.shape[1]
  return (
    dq.astype(q.dtype),
    sum_groups(dk, kv_heads).astype(k.dtype),
    sum_groups(dv, kv_heads).astype(v.dtype),
    dg,
    d_init.astype(initial_state.dtype),
  )


_chunked = common.custom_vjp(_forward, _backward)
