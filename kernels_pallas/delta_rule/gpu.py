"""The delta rule's walk over chunks for GPUs (Pallas, Triton backend), forward and backward.

Same function and signature as `tpu.state_pass` (Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", arXiv 2406.06484, Sec. 3; Gated
DeltaNet's gate, arXiv 2412.06464): with `S` the state entering a chunk,

    out = Q_s S        S' = e S + K_e^T (U - W S)

Tiling: one program per (batch, head, tile of value columns) walks the chunks in order with
the float32 state `S [key_dim, value_tile]` in registers (a `fori_loop` carry). `W S`
contracts key channels, never value columns, so value tiles are independent programs, as in
the chunked-linear kernel. The gradient's forward also stores the state entering every chunk
(`[chunks * key_dim, value_tile]` per program); the backward program walks the chunks in
reverse carrying dS' (see `tpu.py` for its equations). Gradients that sum over value columns
(dQ_s, dW, dK_e, de) are written per value tile and added outside the kernel.

Triton needs power-of-two tiles of at least 16 (`tl.dot`), so C, key_dim and value_dim are
zero-padded to powers of two >= 16: a zero row of every operand reads and writes nothing, zero
key channels keep zero state rows, and the padding is sliced off. float32 operands follow
`jax.default_matmul_precision` (TF32 by default on hardware, IEEE under "highest", which the
1e-4 float32 tolerance needs); 16-bit operands feed bfloat16
matmul operands with float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common, triton
from kernels_pallas.delta_rule.common import check_shapes
from kernels_pallas.triton import MIN_DOT, triton_call


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch parameters of the Triton kernels (defaults not tuned on hardware).

  Attributes:
    block_value: value columns per program (a power of two >= 16; capped at the padded value
      dim). Smaller tiles mean more programs and fewer registers per program.
    num_warps: warps per program (a power of two, 1 to 32).
    num_stages: Triton software-pipelining stages of the chunk loop (>= 1).
  """

  block_value: int = 64
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if not common.is_power_of_two(self.block_value) or self.block_value < MIN_DOT:
      raise ValueError(
        f"block_value must be a power of two >= {MIN_DOT}, got block_value={self.block_value}"
      )
    if not common.is_power_of_two(self.num_warps) or self.num_warps > 32:
      raise ValueError(f"num_warps must be a power of two in [1, 32], got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


WIDE_ROW_TILE = 32


def default_block_sizes(key_dim: int) -> BlockSizes:
  """`BlockSizes()`, with `WIDE_ROW_TILE` value columns per program where a padded float32
  key row (the kernels' tiles are float32 whatever the input dtype) fills
  `triton.WIDE_ROW_BYTES` (key_dim >= 128): at 64 columns the IEEE float32 backward asks an A100
  for 176 KB of its 163 KB of shared memory."""
  if common.next_power_of_two(key_dim, at_least=MIN_DOT) * 4 >= triton.WIDE_ROW_BYTES:
    return BlockSizes(block_value=WIDE_ROW_TILE)
  return BlockSizes()


def chunk_size(key_dim: int, chunk: int) -> int:
  """The chunk the GPU kernel walks: at most `WIDE_ROW_TILE` tokens where a padded float32
  key row is wider than `triton.WIDE_ROW_BYTES` (key_dim 256), since its `[C, key_dim]` tiles of
  64 tokens ask an H200 for 304 KB of its 227 KB (IEEE float32 backward). The chunked delta
  rule is the same function at any chunk size."""
  if common.next_power_of_two(key_dim, at_least=MIN_DOT) * 4 > triton.WIDE_ROW_BYTES:
    return min(chunk, WIDE_ROW_TILE)
  return chunk


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  chunk: int
  block_value: int
  operand_dtype: jnp.dtype
  interpret: bool
  num_warps: int
  num_stages: int


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _rows(n, size):
  return pl.ds(pl.multiple_of(n * size, size), size)


def _forward_kernel(query_state_ref, w_ref, u_ref, k_end_ref, end_decay_ref, init_ref, out_ref,
                    *rest, st, save_states):  # fmt: skip
  states_ref = rest[0] if save_states else None
  final_ref = rest[-1]
  dot = functools.partial(common.dot, dtype=st.operand_dtype)
  key_dim = w_ref.shape[1]

  def step(n, state):
    tokens = _rows(n, st.chunk)
    if save_states:
      states_ref[_rows(n, key_dim), :] = state
    out_ref[tokens, :] = dot(query_state_ref[tokens, :], state)
    new_values = u_ref[tokens, :].astype(jnp.float32) - dot(w_ref[tokens, :], state)
    return end_decay_ref[n] * state + dot(k_end_ref[tokens, :], new_values, transpose_a=True)

  num_chunks = w_ref.shape[0] // st.chunk
  final_ref[...] = jax.lax.fori_loop(0, num_chunks, step, init_ref[...])


def _backward_kernel(
  query_state_ref, w_ref, u_ref, k_end_ref, end_decay_ref, states_ref, d_out_ref, d_final_ref,
  dq_ref, dw_ref, du_ref, dk_ref, de_ref, d_init_ref, *, st,
):  # fmt: skip
  dot = functools.partial(common.dot, dtype=st.operand_dtype)
  key_dim = w_ref.shape[1]
  num_chunks = w_ref.shape[0] // st.chunk

  def step(i, d_state):  # d_state: the gradient of the state after chunk n
    n = num_chunks - 1 - i
    tokens = _rows(n, st.chunk)
    state = states_ref[_rows(n, key_dim), :]
    query_state, w, d_out = query_state_ref[tokens, :], w_ref[tokens, :], d_out_ref[tokens, :]
    new_values = u_ref[tokens, :].astype(jnp.float32) - dot(w, state)
    d_new_values = dot(k_end_ref[tokens, :], d_state)
    dq_ref[tokens, :] = dot(d_out, state, transpose_b=True)
    dk_ref[tokens, :] = dot(new_values, d_state, transpose_b=True)
    du_ref[tokens, :] = d_new_values
    dw_ref[tokens, :] = -dot(d_new_values, state, transpose_b=True)
    de_ref[n] = jnp.sum(d_state * state)
    return (
      end_decay_ref[n] * d_state
      + dot(query_state, d_out, transpose_a=True)
      - dot(w, d_new_values, transpose_a=True)
    )

  d_init_ref[...] = jax.lax.fori_loop(0, num_chunks, step, d_final_ref[...])


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _specs(st, seq, key_dim, num_chunks):
  """BlockSpecs over the grid (batch, head, value tile) of the `[b, h, t, d]` operands."""
  bv = st.block_value

  def whole_head(rows, cols):
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, j: (b, h, 0, 0))

  return dict(
    keys=whole_head(seq, key_dim),
    values=pl.BlockSpec((None, None, seq, bv), lambda b, h, j: (b, h, 0, j)),
    scalars=pl.BlockSpec((None, None, num_chunks), lambda b, h, j: (b, h, 0)),
    state=pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)),
    states=pl.BlockSpec((None, None, num_chunks * key_dim, bv), lambda b, h, j: (b, h, 0, j)),
    keys_per_tile=pl.BlockSpec((None, None, None, seq, key_dim), lambda b, h, j: (b, h, j, 0, 0)),
    scalars_per_tile=pl.BlockSpec((None, None, None, num_chunks), lambda b, h, j: (b, h, j, 0)),
  )


def _forward_call(st, query_state, w, u, k_end, end_decay, initial_state, *, save_states):
  """`[b, h, t, d]` operands -> (out, the states entering each chunk `[b, h, n * key_dim,
  value_dim]` if `save_states`, final state), float32."""
  batch, heads, seq, key_dim = w.shape
  value_dim = u.shape[3]
  num_chunks = seq // st.chunk
  specs = _specs(st, seq, key_dim, num_chunks)
  out_shape = [jax.ShapeDtypeStruct(u.shape, jnp.float32)]
  out_specs = [specs["values"]]
  if save_states:
    states = (batch, heads, num_chunks * key_dim, value_dim)
    out_shape.append(jax.ShapeDtypeStruct(states, jnp.float32))
    out_specs.append(specs["states"])
  out_shape.append(jax.ShapeDtypeStruct(initial_state.shape, jnp.float32))
  out_specs.append(specs["state"])
  return triton_call(
    st,
    functools.partial(_forward_kernel, save_states=save_states),
    (batch, heads, value_dim // st.block_value),
    [specs["keys"], specs["keys"], specs["values"], specs["keys"], specs["scalars"],
     specs["state"]],
    out_specs,
    out_shape,
    "delta_rule_fwd_states_gpu" if save_states else "delta_rule_fwd_gpu",
  )(query_state, w, u, k_end, end_decay, initial_state)  # fmt: skip


def _backward_call(st, query_state, w, u, k_end, end_decay, states, d_out, d_final):
  """(dQ_s, dW, dK_e per value tile `[b, h, tiles, t, key_dim]`, dU, de per value tile
  `[b, h, tiles, n]`, d initial_state), float32."""
  batch, heads, seq, key_dim = w.shape
  value_dim = u.shape[3]
  num_chunks = seq // st.chunk
  tiles = value_dim // st.block_value
  specs = _specs(st, seq, key_dim, num_chunks)
  per_tile = jax.ShapeDtypeStruct((batch, heads, tiles, seq, key_dim), jnp.float32)
  return triton_call(
    st,
    _backward_kernel,
    (batch, heads, tiles),
    [specs["keys"], specs["keys"], specs["values"], specs["keys"], specs["scalars"],
     specs["states"], specs["values"], specs["state"]],
    [specs["keys_per_tile"], specs["keys_per_tile"], specs["values"], specs["keys_per_tile"],
     specs["scalars_per_tile"], specs["state"]],
    [per_tile, per_tile, jax.ShapeDtypeStruct(u.shape, jnp.float32), per_tile,
     jax.ShapeDtypeStruct((batch, heads, tiles, num_chunks), jnp.float32),
     jax.ShapeDtypeStruct(d_final.shape, jnp.float32)],
    "delta_rule_bwd_gpu",
  )(query_state, w, u, k_end, end_decay, states, d_out, d_final)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The public function.


def state_pass(
  query_state: jax.Array,
  w: jax.Array,
  u: jax.Array,
  k_end: jax.Array,
  end_decay: jax.Array,
  initial_state: jax.Array,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The chunked delta rule's walk over chunks; equals `tpu.state_pass` (same arguments, plus
  `block_sizes`: launch parameters, default `default_block_sizes`)."""
  block_sizes = block_sizes or default_block_sizes(w.shape[4])
  check_shapes(query_state, w, u, k_end, end_decay, initial_state)
  triton.check_head_dims(interpret=interpret, key_dim=w.shape[4], value_dim=u.shape[4])
  batch, heads, num_chunks, chunk, key_dim = w.shape
  value_dim = u.shape[4]
  chunk_pad = common.next_power_of_two(chunk, at_least=MIN_DOT)
  key_pad = common.next_power_of_two(key_dim, at_least=MIN_DOT)
  value_pad = common.next_power_of_two(value_dim, at_least=MIN_DOT)
  st = _Static(
    chunk=chunk_pad,
    block_value=min(block_sizes.block_value, value_pad),
    operand_dtype=jnp.dtype(jnp.float32 if w.dtype == jnp.float32 else jnp.bfloat16),
    interpret=bool(interpret),
    num_warps=block_sizes.num_warps,
    num_stages=block_sizes.num_stages,
  )

  def to_kernel_layout(x, width):  # [b, h, n, C, d] -> [b, h, n * C_pad, width]
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, chunk_pad - chunk), (0, width - x.shape[4])])
    return x.reshape(batch, heads, num_chunks * chunk_pad, width)

  state_pad = ((0, 0), (0, 0), (0, key_pad - key_dim), (0, value_pad - value_dim))
  out, final_state = _state_pass(
    st,
    to_kernel_layout(query_state, key_pad),
    to_kernel_layout(w, key_pad),
    to_kernel_layout(u, value_pad),
    to_kernel_layout(k_end, key_pad),
    end_decay.astype(jnp.float32),
    jnp.pad(initial_state.astype(jnp.float32), state_pad),
  )
  out = out.reshape(batch, heads, num_chunks, chunk_pad, value_pad)[:, :, :, :chunk, :value_dim]
  return out, final_state[:, :, :key_dim, :value_dim]


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring: the primal runs the forward kernel that saves no per-chunk states.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _state_pass(st, query_state, w, u, k_end, end_decay, initial_state):
  out, final_state = _forward_call(
    st, query_state, w, u, k_end, end_decay, initial_state, save_states=False
  )
  return out, final_state


def _forward(st, query_state, w, u, k_end, end_decay, initial_state):
  out, states, final_state = _forward_call(
    st, query_state, w, u, k_end, end_decay, initial_state, save_states=True
  )
  return (out, final_state), (query_state, w, u, k_end, end_decay, states)


def _backward(st, residuals, cotangents):
  query_state, w, u, k_end, end_decay, states = residuals
  d_out, d_final = cotangents
  dq, dw, du, dk, de, d_init = _backward_call(
    st, query_state, w, u, k_end, end_decay, states, d_out.astype(jnp.float32),
    d_final.astype(jnp.float32),
  )  # fmt: skip
  dq, dw, dk = (x.sum(axis=2) for x in (dq, dw, dk))
  return (
    dq.astype(query_state.dtype),
    dw.astype(w.dtype),
    du.astype(u.dtype),
    dk.astype(k_end.dtype),
    de.sum(axis=2),
    d_init,
  )


_state_pass.defvjp(_forward, _backward)
