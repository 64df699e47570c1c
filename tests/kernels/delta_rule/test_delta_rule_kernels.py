"""Both delta-rule state-pass kernels, interpreted, through the op's adapter against the
token-by-token reference: outputs, final states and gradients of every input (DeltaNet and Gated
DeltaNet, GQA and MQA, odd lengths and head dims, chunks that are not whole sublanes or
powers of two, packed documents, strong decay, bfloat16); the TPU interpreter's bounds checks;
the primal saving no states; VMEM limits and costs; lowering for TPU and CUDA; bad operands."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax import registry
from attnjax.ops.delta import api, chunk, pallas, reference
from attnjax.ops.qkv import check_qkv
from kernels_pallas import tpu_memory
from kernels_pallas.delta_rule import gpu, tpu
from tests.helpers import TOL_BLOCKED_F32, assert_close, assert_matches_reference, tolerance
from tests.ops.delta.test_delta_rule import _inputs

KERNELS = ("tpu", "gpu")


def _op(kernel, chunk_size, interpret=True):
  """`(q, k, v, beta, **kw) -> (out, final_state)`: the adapter with `kernel` ("tpu", "gpu"),
  or for `kernel=None` the token-by-token reference through the public op."""

  def run(q, k, v, beta, **kw):
    return api.delta_rule_attention(
      q, k, v, beta, chunk_size=chunk_size, return_final_state=True, impl="reference", **kw
    )

  def kernel_run(q, k, v, beta, **kw):
    shape = check_qkv(q, k, v, same_length=True)
    return pallas.delta_rule_attention(
      q, k, v, jnp.asarray(beta, jnp.float32),
      log_decay=kw.get("log_decay", jnp.zeros(beta.shape, jnp.float32)),
      carry=api.document_carry(kw.get("segment_ids"), shape.batch, shape.q_len),
      initial_state=kw["initial_state"], scale=shape.head_dim**-0.5, chunk_size=chunk_size,
      interpret=interpret, kernel=kernel,
    )  # fmt: skip

  return kernel_run if kernel else run


# (sizes, chunk_size, gated): chunks of 8 and 20 tokens are padded to 16 and 32 rows in the
# kernels; key_dim 60 and value_dim 7 are padded on GPU; 5 tokens are shorter than one chunk.
CASES = {
  "gated-gqa-37-chunk8": (dict(seq=37, heads=4, kv_heads=2), 8, True),
  "deltanet-gqa-37-chunk8": (dict(seq=37, heads=4, kv_heads=2), 8, False),
  "gated-mqa-hd60-dv7": (dict(seq=50, heads=3, kv_heads=1, key_dim=60, value_dim=7), 20, True),
  "gated-short": (dict(seq=5, heads=2, kv_heads=2), 64, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference_values_states_and_gradients(kernel, case):
  sizes, chunk_size, gated_decay = case
  args, kwargs = _inputs(1, gated_decay=gated_decay, **sizes)
  assert_matches_reference(
    _op(kernel, chunk_size), _op(None, chunk_size), args, kwargs, TOL_BLOCKED_F32, kernel
  )


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_matches_the_float32_reference(kernel):
  args, kwargs = _inputs(2, dtype=jnp.bfloat16)
  tol = tolerance(jnp.bfloat16)
  assert_matches_reference(_op(kernel, 16), _op(None, 16), args, kwargs, tol, f"{kernel} bf16")


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_documents_restart_the_state(kernel):
  """Documents start inside chunks, at a chunk boundary and as one token; values and gradients."""
  args, kwargs = _inputs(3, seq=29)
  ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], [8, 1, 7, 13], axis=1))
  ids = jnp.concatenate([ids, ids[:, ::-1]], axis=0)
  kwargs["segment_ids"] = ids
  assert_matches_reference(
    _op(kernel, 8), _op(None, 8), args, kwargs, TOL_BLOCKED_F32, f"{kernel} documents"
  )


@pytest.mark.parametrize("kernel", KERNELS)
def test_strong_decay_long_sequence_is_finite_and_memoryless(kernel):
  (q, k, v, beta), kwargs = _inputs(4, batch=1, seq=4096, heads=1, kv_heads=1, key_dim=8,
                                    value_dim=8)  # fmt: skip
  kwargs["log_decay"] = jnp.full_like(kwargs["log_decay"], -30.0)
  run = _op(kernel, 64)

  def loss(q, k, v, beta):
    out, _ = run(q, k, v, beta, **kwargs)
    return jnp.sum(out * out), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, beta)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  expected = 8**-0.5 * beta[..., None] * jnp.sum(q * k, -1, keepdims=True) * v
  assert_close(out, expected, TOL_BLOCKED_F32, "memoryless limit")


def test_tpu_interpreter_checks_bounds_and_matches_reference():
  args, kwargs = _inputs(5, batch=1, seq=20, heads=2, kv_heads=1, key_dim=8, value_dim=8)
  run = _op("tpu", 16, interpret=pltpu.InterpretParams())
  assert_matches_reference(run, _op(None, 16), args, kwargs, TOL_BLOCKED_F32, "InterpretParams")


def test_op_impls_are_the_kernels():
  """`impl="pallas_interpret"` runs the TPU kernel; on a CPU without compile-only devices
  "pallas" is unsupported and "auto" is the xla path."""
  args, kwargs = _inputs(6, seq=19)
  traced = str(
    jax.make_jaxpr(lambda: api.delta_rule_attention(*args, impl="pallas_interpret", **kwargs))()
  )
  assert "delta_rule_fwd" in traced
  with pytest.raises(registry.Unsupported):
    api.delta_rule_attention(*args, impl="pallas", **kwargs)
  auto = api.delta_rule_attention(*args, impl="auto", **kwargs)
  assert_close(auto, api.delta_rule_attention(*args, impl="xla", **kwargs), 1e-6, "auto")


def _terms(seq=40, heads=2, key_dim=8, value_dim=8, chunk_size=16):
  (q, k, v, beta), kwargs = _inputs(7, batch=1, seq=seq, heads=heads, kv_heads=1,
                                    key_dim=key_dim, value_dim=value_dim)  # fmt: skip
  terms = chunk.chunk_terms(q, k, v, beta, kwargs["log_decay"], None, chunk_size)
  return (terms.query_state, terms.w, terms.u, terms.k_end, terms.end_decay,
          kwargs["initial_state"])  # fmt: skip


def _pallas_calls(fn, *args):
  from tests.kernels.chunked_linear.test_chunked_linear_tpu import pallas_calls

  return pallas_calls(fn, *args)


def _gradient_of(fn):
  def loss(*operands):
    out, final = fn(*operands)
    return jnp.sum(out) + jnp.sum(final)

  return jax.grad(loss, argnums=tuple(range(6)))


@pytest.mark.parametrize("kernel, module", [("tpu", tpu), ("gpu", gpu)])
def test_primal_saves_no_states_and_the_gradient_does(kernel, module):
  operands = _terms()
  run = functools.partial(module.state_pass, interpret=True)
  (primal,) = _pallas_calls(run, *operands)
  assert (
    primal.params["name"].startswith("delta_rule_fwd") and "states" not in primal.params["name"]
  )
  forward, backward = _pallas_calls(_gradient_of(run), *operands)
  assert "delta_rule_fwd_states" in forward.params["name"]
  assert backward.params["name"].startswith("delta_rule_bwd")


def test_tpu_calls_set_vmem_limits_and_costs():
  calls = _pallas_calls(_gradient_of(functools.partial(tpu.state_pass, interpret=True)),
                        *_terms(seq=300, key_dim=128, value_dim=128, chunk_size=64))  # fmt: skip
  assert len(calls) == 2
  for call in calls:
    limit = call.params["compiler_params"].vmem_limit_bytes
    assert tpu_memory.MOSAIC_HEADROOM_BYTES < limit <= tpu_memory.smallest_tpu_vmem_bytes()
    cost = call.params["cost_estimate"]
    assert cost.flops > 0 and cost.bytes_accessed > 0


@pytest.mark.parametrize("block_value, programs", [(64, 1), (16, 4)])
def test_gpu_value_tiles_split_the_state_over_programs(block_value, programs):
  """value_dim 40 pads to 64: one program of the default 64 value columns, or four of 16 whose
  partial gradients are added outside; both equal the walk through the xla path's transitions."""
  terms = _terms(value_dim=40)
  tiled = functools.partial(
    gpu.state_pass, block_sizes=gpu.BlockSizes(block_value=block_value), interpret=True
  )
  (call,) = _pallas_calls(tiled, *terms)
  assert call.params["grid_mapping"].grid[2] == programs
  got, got_grads = jax.value_and_grad(lambda *a: _scalar(tiled(*a)), argnums=range(6))(*terms)
  want, want_grads = jax.value_and_grad(
    lambda *a: _scalar(_walk_by_transitions(*a)), argnums=range(6)
  )(*terms)
  assert_close(got, want, TOL_BLOCKED_F32, "value")
  for g, w in zip(got_grads, want_grads, strict=True):
    assert_close(g, w, 2 * TOL_BLOCKED_F32, "gradient")


def _scalar(outputs):
  out, final = outputs
  weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return jnp.sum(out * weights) + jnp.sum(jnp.sin(final))


def _walk_by_transitions(query_state, w, u, k_end, end_decay, initial_state):
  """The walk as the xla path computes it, through each chunk's `[key_dim, key_dim]` map."""
  terms = chunk.ChunkTerms(None, u, w, query_state, k_end, end_decay)

  def step(state, xs):
    transition, update, qs = xs
    return transition @ state + update, qs @ state

  xs = [jnp.moveaxis(x, 2, 0) for x in (terms.transition(), terms.update(), query_state)]
  final, out = jax.lax.scan(step, initial_state, xs)
  return jnp.moveaxis(out, 0, 2), final


def test_gpu_launch_settings_narrow_for_wide_float32_rows():
  assert gpu.default_block_sizes(64) == gpu.BlockSizes()
  assert gpu.default_block_sizes(128) == gpu.BlockSizes(block_value=32)
  assert (gpu.chunk_size(128, 64), gpu.chunk_size(256, 64), gpu.chunk_size(256, 16)) == (64, 32, 16)


def test_gpu_block_sizes_are_validated():
  assert gpu.BlockSizes() == gpu.BlockSizes(block_value=64, num_warps=4, num_stages=1)
  with pytest.raises(ValueError, match="block_value must be a power of two >= 16"):
    gpu.BlockSizes(block_value=24)
  with pytest.raises(ValueError, match="num_warps"):
    gpu.BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match="num_stages"):
    gpu.BlockSizes(num_stages=0)


PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "__gpu$xla.gpu.triton")}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_lowers_forward_and_gradient(kernel, dtype):
  """200 tokens in chunks of 64 (a padded last chunk), GQA, key_dim 60 (padded on GPU)."""
  shapes = [
    jax.ShapeDtypeStruct((1, 200, 4, 60), dtype),
    jax.ShapeDtypeStruct((1, 200, 2, 60), dtype),
    jax.ShapeDtypeStruct((1, 200, 2, 48), dtype),
    jax.ShapeDtypeStruct((1, 200, 4), jnp.float32),
    jax.ShapeDtypeStruct((1, 200, 4), jnp.float32),
    jax.ShapeDtypeStruct((1, 4, 60, 48), jnp.float32),
  ]

  def forward(q, k, v, beta, log_decay, initial_state):
    return _op(kernel, 64, interpret=False)(
      q, k, v, beta, log_decay=log_decay, initial_state=initial_state
    )

  def loss(*operands):
    out, final = forward(*operands)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(final)

  platform, custom_call = PLATFORMS[kernel]
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(custom_call)] if kernel == "gpu" else []
  for fn, kernels in ((forward, 1), (jax.grad(loss, argnums=tuple(range(6))), 2)):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)
    assert exported(*shapes).mlir_module().count(custom_call) == kernels


@pytest.mark.parametrize("module", [tpu, gpu], ids=KERNELS)
def test_bad_operands_name_the_argument(module):
  operands = dict(zip(("query_state", "w", "u", "k_end", "end_decay", "initial_state"), _terms(),
                      strict=True))  # fmt: skip
  bad = {
    "query_state must be": ("query_state", (1, 2, 3, 16)),
    "w must have query_state's shape": ("w", (1, 2, 3, 16, 9)),
    "k_end must have": ("k_end", (1, 2, 3, 15, 8)),
    "u must be": ("u", (1, 2, 2, 16, 8)),
    "end_decay must be": ("end_decay", (1, 2, 4)),
    "initial_state must be": ("initial_state", (1, 2, 8, 9)),
  }
  for message, (name, shape) in bad.items():
    with pytest.raises(ValueError, match=message):
      module.state_pass(**{**operands, name: jnp.zeros(shape)}, interpret=True)


def test_reference_and_kernel_agree_in_the_op_with_chunk_one():
  """chunk_size=1: every chunk is one token (padded to a whole tile), the recurrence itself."""
  args, kwargs = _inputs(9, seq=11)
  got = api.delta_rule_attention(*args, impl="pallas_interpret", chunk_size=1, **kwargs)
  want = reference.delta_rule_attention(
    *args[:3], jnp.asarray(args[3]), carry=None, scale=12**-0.5, chunk_size=1, **kwargs
  )[0]
  assert_close(got, want, TOL_BLOCKED_F32, "chunk 1")


def test_tpu_forward_moves_each_operand_once():
  """Counted in the TPU interpreter: the walk reads every chunk tile and writes every output
  tile exactly once (the operands' bytes), the state never leaving VMEM between chunks."""
  from benchmarks import dma_counts

  operands = _terms(seq=64, heads=2, key_dim=8, value_dim=16, chunk_size=16)
  run = jax.jit(functools.partial(tpu.state_pass, interpret=pltpu.InterpretParams()))
  counts = dma_counts.count(run, *operands)
  (call,) = counts.per_call
  assert call.grid_steps == 2 * 4  # heads x chunks
  f32 = 4
  # Tiles are [16, d] rows of float32 per chunk and head, end decays one word per step, the
  # initial state once per head.
  assert list(call.hbm_to_vmem_by_operand.values()) == [
    2 * 64 * 8 * f32, 2 * 64 * 8 * f32, 2 * 64 * 16 * f32, 2 * 64 * 8 * f32, 2 * 4 * f32,
    2 * 8 * 16 * f32,
  ]  # fmt: skip
  assert list(call.vmem_to_hbm_by_operand.values()) == [2 * 64 * 16 * f32, 2 * 8 * 16 * f32]
