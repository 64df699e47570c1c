"""The delta rule's walk over chunks as a Pallas TPU kernel, forward and backward.

Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
(arXiv 2406.06484), Sec. 3; the gate of Gated DeltaNet (arXiv 2412.06464, Sec. 3.3). With the
chunk terms of `attnjax.ops.delta.chunk.ChunkTerms` (the UT transform's `W`, `U`, the
state-reading queries `Q_s`, the end-decayed keys `K_e` and the end decay `e`, all computed
for every chunk at once by XLA) and `S` the state entering a chunk:

    out = Q_s S                       (the op adds the intra-chunk part P U)
    S'  = e S + K_e^T (U - W S)       (U - W S: the values the chunk writes, corrected for S)

The grid walks the chunks of one (batch, head) in order, the float32 state
`[key_dim, value_dim]` in VMEM scratch: no `[key_dim, key_dim]` transition is ever formed and
per chunk the kernel reads `[C, key_dim]` and `[C, value_dim]` tiles, three MXU products.

The backward kernel walks the chunks in reverse carrying dS, the gradient of the state after
the chunk, from the states the gradient's forward saved (one `[key_dim, value_dim]` per chunk):

    dQ_s = dO S^T     dU = K_e dS'     dW = -dU S^T     dK_e = (U - W S) dS'^T
    de = <dS', S>     dS = e dS' + Q_s^T dO - W^T dU

Matmul operands are in the operands' dtype (bfloat16 operands feed the MXU bfloat16, the state
rounded to it), accumulation and the state in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common, tpu_memory
from kernels_pallas.delta_rule.common import check_shapes

# Chunk rows are padded to whole sublanes of both float32 (8) and bfloat16 (16) tiles.
CHUNK_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  mxu_dtype: jnp.dtype
  interpret: bool | pltpu.InterpretParams


def _dot(st, a, b, **transposes):
  """Matmul of 2-D tiles in `st.mxu_dtype`, float32 accumulation (`common.dot`)."""
  return common.dot(a, b, dtype=st.mxu_dtype, **transposes)


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _forward_kernel(*refs, st, save_states):
  query_state_ref, w_ref, u_ref, k_end_ref, end_decay_ref, init_ref, out_ref, *rest = refs
  states_ref = rest.pop(0) if save_states else None
  final_ref, state = rest
  chunk_index = pl.program_id(2)

  @pl.when(chunk_index == 0)
  def _():
    state[...] = init_ref[...]

  state_before = state[...]
  if save_states:
    states_ref[...] = state_before
  out_ref[...] = _dot(st, query_state_ref[...], state_before)
  new_values = u_ref[...].astype(jnp.float32) - _dot(st, w_ref[...], state_before)
  state[...] = end_decay_ref[...] * state_before + _dot(
    st, k_end_ref[...], new_values, transpose_a=True
  )

  @pl.when(chunk_index == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = state[...]


def _backward_kernel(*refs, st):
  query_state_ref, w_ref, u_ref, k_end_ref, end_decay_ref, states_ref, d_out_ref = refs[:7]
  d_final_ref, dq_ref, dw_ref, du_ref, dk_ref, de_ref, d_init_ref, d_state = refs[7:]
  step = pl.program_id(2)  # chunks are visited last to first

  @pl.when(step == 0)
  def _():
    d_state[...] = d_final_ref[...]

  query_state, w, d_out = query_state_ref[...], w_ref[...], d_out_ref[...]
  state_before, d_state_after = states_ref[...], d_state[...]
  end_decay = end_decay_ref[...]
  new_values = u_ref[...].astype(jnp.float32) - _dot(st, w, state_before)
  d_new_values = _dot(st, k_end_ref[...], d_state_after)
  dq_ref[...] = _dot(st, d_out, state_before, transpose_b=True)
  dk_ref[...] = _dot(st, new_values, d_state_after, transpose_b=True)
  du_ref[...] = d_new_values
  dw_ref[...] = -_dot(st, d_new_values, state_before, transpose_b=True)
  through_state = jnp.sum(d_state_after * state_before, axis=1, keepdims=True)
  de_ref[...] = jnp.sum(through_state, axis=0, keepdims=True)
  d_state[...] = (
    end_decay * d_state_after
    + _dot(st, query_state, d_out, transpose_a=True)
    - _dot(st, w, d_new_values, transpose_a=True)
  )

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    d_init_ref[...] = d_state[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _specs(chunk, key_dim, value_dim, num_chunks, *, reverse):
  """BlockSpecs over the grid (batch, head, chunk) of the `[b, h, n, ...]` operands."""

  def chunk_of(n):
    return num_chunks - 1 - n if reverse else n

  def per_chunk(rows, cols):
    return pl.BlockSpec((None, None, None, rows, cols), lambda b, h, n: (b, h, chunk_of(n), 0, 0))

  return dict(
    keys=per_chunk(chunk, key_dim),
    values=per_chunk(chunk, value_dim),
    scalar=per_chunk(1, 1),
    states=per_chunk(key_dim, value_dim),
    state=pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, n: (b, h, 0, 0)),
  )


def _pallas_call(kernel, st, operands, specs, *, matmuls, name):
  """One Mosaic call over the grid (batch, heads, chunks) with a float32 state scratch;
  `specs` = (in_specs, out_specs, out_shape); `matmuls` [C, d] x [d, d'] products per chunk."""
  in_specs, out_specs, out_shape = specs
  batch, heads, num_chunks, chunk, key_dim = operands[0].shape
  value_dim = operands[2].shape[4]
  state = (key_dim, value_dim)
  # Live float32 values of one step: a few [C, dim] tiles and [key_dim, value_dim] states.
  temporaries = 4 * (4 * chunk * max(key_dim, value_dim) + 3 * key_dim * value_dim)
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, num_chunks),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=[pltpu.VMEM(state, jnp.float32)],
    compiler_params=tpu_memory.compiler_params(
      ("parallel", "parallel", "arbitrary"),
      in_specs,
      operands,
      out_specs,
      out_shape,
      [pltpu.VMEM(state, jnp.float32)],
      temporaries,
    ),
    cost_estimate=pl.CostEstimate(
      flops=batch * heads * num_chunks * chunk * 2 * key_dim * value_dim * matmuls,
      transcendentals=0,
      bytes_accessed=tpu_memory.nbytes(*operands, *out_shape),
    ),
    interpret=st.interpret,
    name=name,
  )(*operands)


def _forward_call(st, query_state, w, u, k_end, end_decay, initial_state, *, save_states):
  """Returns (out, the state before every chunk `[b, h, n, key_dim, value_dim]` if
  `save_states`, final state)."""
  batch, heads, num_chunks, chunk, key_dim = query_state.shape
  value_dim = u.shape[4]
  specs = _specs(chunk, key_dim, value_dim, num_chunks, reverse=False)
  out_shape = [jax.ShapeDtypeStruct(u.shape, jnp.float32)]
  out_specs = [specs["values"]]
  if save_states:
    out_shape.append(
      jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32)
    )
    out_specs.append(specs["states"])
  out_shape.append(jax.ShapeDtypeStruct(initial_state.shape, jnp.float32))
  out_specs.append(specs["state"])
  in_specs = [specs["keys"], specs["keys"], specs["values"], specs["keys"], specs["scalar"],
              specs["state"]]  # fmt: skip
  return _pallas_call(
    functools.partial(_forward_kernel, st=st, save_states=save_states),
    st,
    (query_state, w, u, k_end, end_decay, initial_state),
    (in_specs, out_specs, out_shape),
    matmuls=3,
    name="delta_rule_fwd_states" if save_states else "delta_rule_fwd",
  )


def _backward_call(st, query_state, w, u, k_end, end_decay, states, d_out, d_final):
  """(dQ_s, dW, dU, dK_e, de `[b, h, n, 1, 1]`, d initial_state), float32."""
  _, _, num_chunks, chunk, key_dim = query_state.shape
  value_dim = u.shape[4]
  specs = _specs(chunk, key_dim, value_dim, num_chunks, reverse=True)
  in_specs = [specs["keys"], specs["keys"], specs["values"], specs["keys"], specs["scalar"],
              specs["states"], specs["values"], specs["state"]]  # fmt: skip
  out_specs = [specs["keys"], specs["keys"], specs["values"], specs["keys"], specs["scalar"],
               specs["state"]]  # fmt: skip
  out_shape = [
    jax.ShapeDtypeStruct(x.shape, jnp.float32)
    for x in (query_state, w, u, k_end, end_decay, d_final)
  ]
  return _pallas_call(
    functools.partial(_backward_kernel, st=st),
    st,
    (query_state, w, u, k_end, end_decay, states, d_out, d_final),
    (in_specs, out_specs, out_shape),
    matmuls=7,
    name="delta_rule_bwd",
  )


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
  interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
  """The chunked delta rule's walk over chunks (see the module docstring).

  Args:
    query_state: `[batch, heads, chunks, C, key_dim]`, `Q_s`; matmul operands take its dtype.
    w: `[batch, heads, chunks, C, key_dim]`, the UT transform's `W`.
    u: `[batch, heads, chunks, C, value_dim]`, the values written from a zero state.
    k_end: `[batch, heads, chunks, C, key_dim]`, keys decayed to their chunk's end.
    end_decay: float32 `[batch, heads, chunks]`, the entering state's decay over each chunk.
    initial_state: float32 `[batch, heads, key_dim, value_dim]`.
    interpret: run in the Pallas interpreter (CPU); `pltpu.InterpretParams()` selects the TPU
      interpreter, which also checks for races and out-of-bounds blocks.

  Returns:
    (`out [batch, heads, chunks, C, value_dim] = Q_s S_n`, `final_state`), float32.

  Raises:
    ValueError: a shape breaks the contract above, or the blocks overflow a TPU's VMEM.
  """
  check_shapes(query_state, w, u, k_end, end_decay, initial_state)
  chunk = query_state.shape[3]
  padded = -(-chunk // CHUNK_MULTIPLE) * CHUNK_MULTIPLE
  dtype = jnp.dtype(query_state.dtype)

  def pad_rows(x):  # zero rows read nothing and write nothing
    return jnp.pad(x, [(0, 0)] * 3 + [(0, padded - chunk), (0, 0)]).astype(dtype)

  st = _Static(mxu_dtype=dtype, interpret=interpret)
  out, final_state = _state_pass(
    st,
    *(pad_rows(x) for x in (query_state, w, u, k_end)),
    end_decay.astype(jnp.float32)[..., None, None],
    initial_state.astype(jnp.float32),
  )
  return out[:, :, :, :chunk], final_state


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
  grads = _backward_call(
    st, query_state, w, u, k_end, end_decay, states, d_out.astype(st.mxu_dtype),
    d_final.astype(jnp.float32),
  )  # fmt: skip
  *d_operands, d_end_decay, d_init = grads
  d_operands = [
    g.astype(x.dtype) for g, x in zip(d_operands, (query_state, w, u, k_end), strict=True)
  ]
  return (*d_operands, d_end_decay, d_init)


_state_pass.defvjp(_forward, _backward)
