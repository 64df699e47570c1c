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
per head is broadcast to it) uses the MXU for the [C, C] scores and reaches the kernel as one
lane-dense row of G per chunk; a decay per key channel (GLA, `[batch, seq, heads, key_dim]`)
builds the scores one query row at a time from [C, key_dim] tiles, exactly, without the
overflow-prone `k e^{-G}` factorization.

Two forward kernels: the primal one (no gradient taken) writes only the output and the final
state; the one of the `custom_vjp`'s forward rule also saves the state before every chunk for
the backward kernel, which walks the chunks in reverse carrying dS, the gradient of the state,
and gets the decay gradient from the identity dG_i = q_i * dq_i - k_i * dk_i (+ <dS', S'> on
the chunk's last token), which holds because G enters only through q e^{G}, k e^{-G} and
e^{G_C}.

Matmul operands are in the inputs' dtype (bfloat16 inputs feed the MXU bfloat16, the state and
the decayed tiles rounded to it), accumulation and everything elementwise in float32. Layout
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

from kernels_pallas import common, tpu_memory
from kernels_pallas.chunked_linear.common import check_shapes, sum_groups

CHUNK_MULTIPLE = 16  # chunk granularity that tiles both float32 (8) and bfloat16 (16) sublanes
# The smallest chunk the op runs on TPU: [C, C] score tiles fill the 128-wide MXU, and the
# per-chunk state traffic is amortized over at least 128 tokens.
MIN_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per chunk: the [C, C] intra-chunk tile and the state-update granularity."""

  chunk: int = MIN_CHUNK

  def __post_init__(self):
    if self.chunk < CHUNK_MULTIPLE or self.chunk % CHUNK_MULTIPLE:
      raise ValueError(f"chunk must be a positive multiple of {CHUNK_MULTIPLE}, got {self.chunk}")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  chunk: int
  vector: bool  # one log decay per key channel (else one per token and head)
  mxu_dtype: jnp.dtype  # the inputs' dtype: what matmul operands are rounded to
  interpret: bool | pltpu.InterpretParams


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _dot(st, a, b, **transposes):
  """Matmul of 2-D tiles in `st.mxu_dtype`, float32 accumulation (`common.dot`)."""
  return common.dot(a, b, dtype=st.mxu_dtype, **transposes)


def _diagonal(n):
  return jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
    jnp.int32, (n, n), 1
  )


def _row_to_column(row):
  """`[1, n]` -> `[n, 1]` through the diagonal of an [n, n] select (no transpose op)."""
  return jnp.sum(jnp.where(_diagonal(row.shape[1]), row, 0.0), axis=1, keepdims=True)


def _column_to_row(column):
  """`[n, 1]` -> `[1, n]`, the inverse of `_row_to_column`."""
  return jnp.sum(jnp.where(_diagonal(column.shape[0]), column, 0.0), axis=0, keepdims=True)


@dataclasses.dataclass(frozen=True)
class _Decays:
  """The decays of one chunk: e^{G_i} and e^{G_C - G_j} (`[C, 1]` scalar, `[C, f]` vector),
  e^{G_C} as a column over key channels (`[1, 1]` or `[f, 1]`), and G as loaded."""

  q: jax.Array
  k: jax.Array
  state: jax.Array
  g: jax.Array
  g_column: jax.Array  # G per token: `[C, 1]` (scalar) or `[C, f]` (vector)


def _chunk_decays(st, g_ref):
  """From G as the kernel gets it: a row `[1, C]` (scalar) or a `[C, f]` tile (vector)."""
  g = g_ref[...]
  if st.vector:
    g_tokens, g_last_row = g, g[g.shape[0] - 1 :, :]
    g_last_column = _row_to_column(g_last_row)
  else:
    g_tokens, g_last_row = _row_to_column(g), g[:, g.shape[1] - 1 :]
    g_last_column = g_last_row
  return _Decays(
    q=jnp.exp(g_tokens),
    k=jnp.exp(g_last_row - g_tokens),
    state=jnp.exp(g_last_column),
    g=g,
    g_column=g_tokens,
  )


def _decay_matrix(decays):
  """Scalar decay: `D_ij = e^{G_i - G_j}` for j <= i, else 0 (`[C, C]`)."""
  g_row = decays.g
  chunk = g_row.shape[1]
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return jnp.exp(jnp.where(rows >= cols, decays.g_column - g_row, -jnp.inf))


def _row_decays(g_ref, i, g):
  """Vector decay, query row i: (`e^{G_i - G_j}` [C, f] clipped at 1 where j > i, j <= i [C, 1])."""
  decay = jnp.exp(jnp.minimum(g_ref[pl.ds(i, 1), :] - g, 0.0))
  return decay, jax.lax.broadcasted_iota(jnp.int32, (g.shape[0], 1), 0) <= i


def _forward_kernel(*refs, st, save_states):
  q_ref, k_ref, v_ref, g_ref, init_ref, out_ref, *rest = refs
  states_ref = rest.pop(0) if save_states else None
  final_ref, state = rest
  chunk_index = pl.program_id(2)

  @pl.when(chunk_index == 0)
  def _():
    state[...] = init_ref[...]

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  decays = _chunk_decays(st, g_ref)
  state_before = state[...]
  if save_states:
    states_ref[...] = state_before
  inter = _dot(st, q * decays.q, state_before)
  if st.vector:
    # Per-channel decay makes each score a sum over channels of differently decayed
    # products, so scores are built one query row at a time: [C, f] tiles, no [C, C, f].
    out_ref[...] = inter
    g = decays.g

    def add_row(i, carry):
      decay, visible = _row_decays(g_ref, i, g)
      scores = jnp.where(visible, jnp.sum(q_ref[pl.ds(i, 1), :] * k * decay, 1, keepdims=True), 0.0)
      out_ref[pl.ds(i, 1), :] += jnp.sum(scores * v, axis=0, keepdims=True)
      return carry

    jax.lax.fori_loop(0, g.shape[0], add_row, 0)
  else:
    scores = _dot(st, q, k, transpose_b=True) * _decay_matrix(decays)
    out_ref[...] = inter + _dot(st, scores, v)
  state[...] = decays.state * state_before + _dot(st, k * decays.k, v, transpose_a=True)

  @pl.when(chunk_index == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = state[...]


def _backward_kernel(*refs, st):
  q_ref, k_ref, v_ref, g_ref, states_ref, d_out_ref, d_final_ref, *rest = refs
  dq_ref, dk_ref, dv_ref, dg_ref, d_init_ref, d_state = rest
  step = pl.program_id(2)  # chunks are visited last to first

  @pl.when(step == 0)
  def _():
    d_state[...] = d_final_ref[...]

  q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], d_out_ref[...]
  decays = _chunk_decays(st, g_ref)
  state_before, d_state_after = states_ref[...], d_state[...]
  k_to_end = k * decays.k
  # Through the state: o_i += (q_i e^{G_i}) S and S' += (k_j e^{G_C - G_j})^T v_j.
  dq = _dot(st, d_out, state_before, transpose_b=True) * decays.q
  dk = _dot(st, v, d_state_after, transpose_b=True) * decays.k
  dv = _dot(st, k_to_end, d_state_after)
  if st.vector:
    dq_ref[...] = dq
    g = decays.g

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
    decay_matrix = _decay_matrix(decays)
    scores = _dot(st, q, k, transpose_b=True) * decay_matrix
    d_scores = _dot(st, d_out, v, transpose_b=True) * decay_matrix
    dq = dq + _dot(st, d_scores, k)
    dk = dk + _dot(st, d_scores, q, transpose_a=True)
    dv = dv + _dot(st, scores, d_out, transpose_a=True)
    dq_ref[...] = dq
  dk_ref[...] = dk
  dv_ref[...] = dv
  state_after = decays.state * state_before + _dot(st, k_to_end, v, transpose_a=True)
  # <dS', S'> per key channel: the explicit e^{G_C} factor of S', on the chunk's last token.
  through_state = _column_to_row(jnp.sum(d_state_after * state_after, axis=1, keepdims=True))
  is_last = jax.lax.broadcasted_iota(jnp.int32, (k.shape[0], 1), 0) == k.shape[0] - 1
  d_g = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk
  d_g += jnp.where(is_last, through_state, 0.0)
  dg_ref[...] = d_g if st.vector else _column_to_row(jnp.sum(d_g, axis=1, keepdims=True))
  d_state[...] = decays.state * d_state_after + _dot(st, q * decays.q, d_out, transpose_a=True)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    d_init_ref[...] = d_state[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _specs(q, k, v, g, chunk, *, reverse):
  """BlockSpecs of the [b, h, t, d]-layout operands, walking chunks forward or in reverse.

  `g` is `[b, h, n, 1, C]` (scalar decay, one row per chunk) or `[b, h, t, f]` (vector)."""
  heads, seq, key_dim = q.shape[1:]
  groups, value_dim = heads // k.shape[1], v.shape[3]
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
    g=tokens(key_dim) if g.ndim == 4 else per_chunk(1, chunk),
    states=per_chunk(key_dim, value_dim),
    state=pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, n: (b, h, 0, 0)),
  )


def _compiler_params(in_specs, out_specs, operands, out_shape, state, temporaries):
  """Megacore-parallel batch and heads, sequential chunks; the VMEM limit of these blocks."""
  return tpu_memory.compiler_params(
    ("parallel", "parallel", "arbitrary"),
    in_specs,
    operands,
    out_specs,
    out_shape,
    [pltpu.VMEM(state, jnp.float32)],
    temporaries,
  )


def _temporaries(st, key_dim, value_dim):
  """Live float32 values of one grid step: a few [C, C] tiles (scalar decay) or [C, f] row
  decays (vector), and a few [C, dim] and [key_dim, value_dim] tiles."""
  chunk = st.chunk
  big = key_dim * chunk if st.vector else chunk * chunk
  return 4 * (4 * big + 6 * chunk * max(key_dim, value_dim) + 3 * key_dim * value_dim)


def _cost(st, q, v, *, passes, bytes_accessed):
  """`passes` [C, d] x [d, d'] state products and [C, C] score products per chunk and head
  (matmul flops); exponentials of the decays."""
  batch, heads, seq, key_dim = q.shape
  value_dim, chunk = v.shape[3], st.chunk
  state_passes, score_passes = passes
  flops = batch * heads * seq * 2 * key_dim * value_dim * state_passes
  flops += batch * heads * seq * chunk * (key_dim + value_dim) * score_passes
  exps = batch * heads * seq * (chunk * key_dim if st.vector else chunk)
  return pl.CostEstimate(flops=flops, transcendentals=exps, bytes_accessed=bytes_accessed)


def _pallas_call(kernel, st, operands, specs, *, passes, bytes_accessed, name):
  """One Mosaic call over the grid (batch, heads, chunks) with a float32 state scratch;
  `specs` = (in_specs, out_specs, out_shape), `passes` as in `_cost`."""
  in_specs, out_specs, out_shape = specs
  q, v = operands[0], operands[2]
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, seq // st.chunk),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=[pltpu.VMEM((key_dim, value_dim), jnp.float32)],
    compiler_params=_compiler_params(
      in_specs,
      out_specs,
      operands,
      out_shape,
      (key_dim, value_dim),
      _temporaries(st, key_dim, value_dim),
    ),  # fmt: skip
    cost_estimate=_cost(st, q, v, passes=passes, bytes_accessed=bytes_accessed),
    interpret=st.interpret,
    name=name,
  )(*operands)


def _forward_call(st, q, k, v, g, initial_state, *, save_states):
  """`[b, h, t, d]` operands, `g` the chunk-local cumulative log decay (see `_specs`).

  Returns (out, the state before every chunk `[b, h, n, key_dim, value_dim]` if
  `save_states`, final state).
  """
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  groups = heads // k.shape[1]
  specs = _specs(q, k, v, g, st.chunk, reverse=False)
  state_shape = jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32)]
  out_specs = [specs["v_sized"]]
  if save_states:
    per_chunk = (batch, heads, seq // st.chunk, key_dim, value_dim)
    out_shape.append(jax.ShapeDtypeStruct(per_chunk, jnp.float32))
    out_specs.append(specs["states"])
  out_shape.append(state_shape)
  out_specs.append(specs["state"])
  operands = (q, k, v, g, initial_state)
  in_specs = [specs["q"], specs["k"], specs["v"], specs["g"], specs["state"]]
  return _pallas_call(
    functools.partial(_forward_kernel, st=st, save_states=save_states),
    st,
    operands,
    (in_specs, out_specs, out_shape),
    passes=(2, 2),
    bytes_accessed=tpu_memory.nbytes(q, g, initial_state, *out_shape)
    + groups * tpu_memory.nbytes(k, v),
    name="chunked_linear_fwd_states" if save_states else "chunked_linear_fwd",
  )


def _backward_call(st, q, k, v, g, states, d_out, d_final):
  """(dq, dk per query head, dv per query head, dg, d initial_state), all float32."""
  batch, heads, seq, key_dim = q.shape
  value_dim = v.shape[3]
  groups = heads // k.shape[1]
  specs = _specs(q, k, v, g, st.chunk, reverse=True)
  operands = (q, k, v, g, states, d_out, d_final)
  in_specs = [
    specs["q"], specs["k"], specs["v"], specs["g"], specs["states"], specs["v_sized"],
    specs["state"],
  ]  # fmt: skip
  out_specs = [specs["q"], specs["q"], specs["v_sized"], specs["g"], specs["state"]]
  out_shape = [
    jax.ShapeDtypeStruct(q.shape, jnp.float32),
    jax.ShapeDtypeStruct(q.shape, jnp.float32),
    jax.ShapeDtypeStruct((batch, heads, seq, value_dim), jnp.float32),
    jax.ShapeDtypeStruct(g.shape, jnp.float32),
    jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
  ]
  return _pallas_call(
    functools.partial(_backward_kernel, st=st),
    st,
    operands,
    (in_specs, out_specs, out_shape),
    passes=(6, 5),
    bytes_accessed=tpu_memory.nbytes(q, g, states, d_out, d_final, *out_shape)
    + groups * tpu_memory.nbytes(k, v),
    name="chunked_linear_bwd",
  )


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

  Raises:
    ValueError: a shape breaks the contract above, or the blocks overflow a TPU's VMEM.
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
  if vector:
    g = g.reshape(batch, padded, heads, -1).transpose(0, 2, 1, 3)
  else:  # one lane-dense row of G per chunk: [b, h, n, 1, C]
    g = g.transpose(0, 3, 1, 4, 2)
  st = _Static(chunk=chunk, vector=vector, mxu_dtype=jnp.dtype(q.dtype), interpret=interpret)
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
# custom_vjp wiring: the primal runs the forward kernel that saves no per-chunk states.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(st, q, k, v, g, initial_state):
  out, final_state = _forward_call(st, q, k, v, g, initial_state, save_states=False)
  return out, final_state


def _forward(st, q, k, v, g, initial_state):
  out, states, final_state = _forward_call(st, q, k, v, g, initial_state, save_states=True)
  return (out, final_state), (q, k, v, g, states)


def _backward(st, residuals, cotangents):
  q, k, v, g, states = residuals
  d_out, d_final = cotangents
  # The output cotangent feeds the MXU next to q, k, v: in their dtype.
  dq, dk, dv, dg, d_init = _backward_call(
    st, q, k, v, g, states, d_out.astype(q.dtype), d_final.astype(jnp.float32)
  )
  kv_heads = k.shape[1]
  return (
    dq.astype(q.dtype),
    sum_groups(dk, kv_heads).astype(k.dtype),
    sum_groups(dv, kv_heads).astype(v.dtype),
    dg,
    d_init,
  )


_chunked.defvjp(_forward, _backward)
