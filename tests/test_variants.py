"""Every registered variant, through every implementation, against its reference, and every
declared capability checked on the op: a variant that declares what it does not do fails here.

Inputs come from each variant's registered `example` (fresh random arrays, GQA where
declared, odd lengths); no test below names a variant.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, registry
from tests.helpers import TOL_BLOCKED_F32, assert_close, assert_matches_reference, jit_call

SEQ = 21
CUT = 9  # a position inside the sequence, off any block boundary

VARIANTS = registry.names()
IMPL_CASES = [
  (name, impl)
  for name in VARIANTS
  for impl in registry.get(name).impl_names
  if impl not in ("reference", "pallas")  # pallas needs a TPU or GPU: see test_pallas_off_cpu
]


def _inputs(variant, seed=0):
  return variant.example_inputs(jax.random.key(seed), seq=SEQ)


def _is_token_array(x, batch: int, length: int) -> bool:
  return isinstance(x, jax.Array) and x.ndim >= 2 and x.shape[:2] == (batch, length)


def _token_map(fn, args, kwargs, batch, length):
  """Applies `fn` to every per-token array (`[batch, seq, ...]`) of a call's arguments."""
  return jax.tree.map(
    lambda x: fn(x) if _is_token_array(x, batch, length) else x,
    (args, kwargs),
    is_leaf=lambda x: isinstance(x, jax.Array),
  )


def _perturb_from(args, kwargs, start: int, batch: int, length: int, seed: int = 1):
  """The call with every per-token array changed at positions >= `start`."""

  def perturb(x):
    noise = 0.5 * jax.random.normal(jax.random.key(seed), x.shape, jnp.float32)
    later = (jnp.arange(x.shape[1]) >= start).reshape(1, -1, *([1] * (x.ndim - 2)))
    return jnp.where(later, x + noise.astype(x.dtype), x)

  return _token_map(perturb, args, kwargs, batch, length)


def _out(result):
  return result[0] if isinstance(result, tuple) else result


def _batch_length(args):
  """(batch, sequence length) of a call: the longest second axis among its token arrays."""
  arrays = [x for x in args if isinstance(x, jax.Array) and x.ndim >= 3]
  return arrays[0].shape[0], max(x.shape[1] for x in arrays)


@pytest.mark.parametrize("name,impl", IMPL_CASES, ids=[f"{n}-{i}" for n, i in IMPL_CASES])
def test_every_implementation_matches_the_reference(name, impl):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  assert_matches_reference(
    variant.impls[impl], variant.reference, args, kwargs, TOL_BLOCKED_F32, f"{name} {impl}"
  )


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_is_the_variant_called_with_impl_reference(name):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  np.testing.assert_array_equal(
    np.asarray(_out(jit_call(variant.reference, args, kwargs))),
    np.asarray(_out(jit_call(functools.partial(variant, impl="reference"), args, kwargs))),
  )
  assert variant.paper and variant.description and variant.module


@pytest.mark.parametrize("name", VARIANTS)
def test_declared_causal_and_bidirectional_forms(name):
  variant = registry.get(name)
  caps = variant.capabilities
  args, kwargs = _inputs(variant)
  batch, length = _batch_length(args)
  call = variant.reference
  cut = CUT if length > CUT else length // 2  # spatial: a row of the grid
  if caps.causal:
    causal_kwargs = {**kwargs, **caps.causal_options()}
    before = _out(jit_call(call, args, causal_kwargs))
    a, kw = _perturb_from(args, causal_kwargs, cut, batch, length)
    after = _out(jit_call(call, a, kw))
    assert_close(after[:, :cut], before[:, :cut], 1e-6, f"{name}: causal form reads the future")
    assert not np.allclose(after[:, cut:], before[:, cut:]), f"{name}: perturbation inert"
  if caps.bidirectional:
    both_kwargs = {**kwargs, "causal": False} if caps.causal_keyword else kwargs
    before = _out(jit_call(call, args, both_kwargs))
    a, kw = _perturb_from(args, both_kwargs, 1, batch, length)
    after = _out(jit_call(call, a, kw))
    assert not np.allclose(after[:, 0], before[:, 0], atol=1e-6), (
      f"{name}: declared bidirectional, but position 0 ignores later positions"
    )


def _with_capability(flag):
  return [n for n in VARIANTS if getattr(registry.get(n).capabilities, flag)]


def _fast_impls(name):
  return [i for i in registry.get(name).impl_names if i not in ("reference", "pallas")]


@pytest.mark.parametrize("name", _with_capability("mask"))
def test_declared_mask_is_applied_by_every_implementation(name):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  masked = {**kwargs, "mask": masks.causal() & masks.sliding_window(3)}
  plain = _out(jit_call(variant.reference, args, kwargs))
  windowed = _out(jit_call(variant.reference, args, masked))
  assert not np.allclose(plain, windowed), f"{name}: mask= has no effect"
  batch, length = _batch_length(args)
  a, kw = _perturb_from(args, masked, 0, batch, length)  # inputs far outside the window
  shifted = _out(jit_call(variant.reference, a, kw))
  assert not np.allclose(shifted, windowed)
  for impl in _fast_impls(name):
    assert_close(_out(jit_call(variant.impls[impl], args, masked)), windowed, TOL_BLOCKED_F32, impl)


def _two_documents(batch: int, length: int) -> jax.Array:
  starts = np.array([[CUT], [CUT - 4]][:batch] + [[CUT]] * max(0, batch - 2))
  return jnp.asarray((np.arange(length)[None] >= starts).astype(np.int32))


@pytest.mark.parametrize("name", _with_capability("segment_ids"))
def test_declared_segment_ids_keep_documents_apart(name):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  batch, length = _batch_length(args)
  segment_ids = _two_documents(batch, length)
  packed = {**kwargs, "segment_ids": segment_ids}
  before = _out(jit_call(variant.reference, args, packed))

  def perturb_first_document(x):
    noise = 0.5 * jax.random.normal(jax.random.key(3), x.shape, jnp.float32)
    first = (segment_ids == 0).reshape(*segment_ids.shape, *([1] * (x.ndim - 2)))
    return jnp.where(first, x + noise.astype(x.dtype), x)

  a, kw = _token_map(perturb_first_document, args, packed, batch, length)
  after = _out(jit_call(variant.reference, a, kw))
  second = np.asarray(segment_ids == 1)
  assert_close(np.asarray(after)[second], np.asarray(before)[second], 1e-6, name)
  for impl in _fast_impls(name):
    out = _out(jit_call(variant.impls[impl], args, packed))
    assert_close(out, before, TOL_BLOCKED_F32, f"{name} {impl}")


@pytest.mark.parametrize("name", _with_capability("lse"))
def test_declared_lse_is_returned_by_every_implementation(name):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  out, lse = jit_call(functools.partial(variant.reference, return_lse=True), args, kwargs)
  batch, length = _batch_length(args)
  assert lse.shape == (batch, length, out.shape[2]) and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(lse)))
  for impl in _fast_impls(name):
    with_lse = functools.partial(variant, return_lse=True, impl=impl)
    fast_out, fast_lse = jit_call(with_lse, args, kwargs)
    assert_close(fast_out, out, TOL_BLOCKED_F32, impl)
    assert_close(fast_lse, lse, TOL_BLOCKED_F32, impl)


@pytest.mark.parametrize("name", _with_capability("state"))
def test_declared_state_runs_in_pieces_and_token_by_token(name):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  batch, length = _batch_length(args)
  full = jit_call(variant.reference, args, kwargs)
  first = _token_map(lambda x: x[:, :CUT], args, kwargs, batch, length)
  rest = _token_map(lambda x: x[:, CUT:], args, kwargs, batch, length)
  out_a, state = variant.reference(*first[0], **first[1], return_final_state=True)
  out_b = variant.reference(*rest[0], **rest[1], initial_state=state)
  assert_close(jnp.concatenate([out_a, out_b], axis=1), full, TOL_BLOCKED_F32, "pieces")
  state, outs = None, []
  for t in range(5):
    token_args, token_kwargs = _token_map(
      lambda x, t=t: x[:, t : t + 1], args, kwargs, batch, length
    )
    q_t, k_t, v_t = (x[:, 0] for x in token_args[:3])
    out_t, state = variant.step(q_t, k_t, v_t, state, **token_kwargs)
    outs.append(out_t)
  assert_close(jnp.stack(outs, axis=1), full[:, :5], TOL_BLOCKED_F32, "step")


@pytest.mark.parametrize("name", [n for n in VARIANTS if not registry.get(n).capabilities.state])
def test_a_variant_without_state_has_no_step(name):
  variant = registry.get(name)
  token = jnp.ones((1, 2, 4))
  with pytest.raises(ValueError, match="no one-token step"):
    variant.step(token, token, token)


@pytest.mark.parametrize("name", VARIANTS)
def test_pallas_off_cpu_is_unsupported_and_auto_falls_back(name):
  variant = registry.get(name)
  args, kwargs = _inputs(variant)
  if "pallas" in variant.impl_names and jax.default_backend() == "cpu":
    with pytest.raises(registry.Unsupported):
      variant(*args, **kwargs, impl="pallas")
  assert_close(
    _out(jit_call(functools.partial(variant, impl="auto"), args, kwargs)),
    _out(jit_call(variant.reference, args, kwargs)),
    TOL_BLOCKED_F32,
    "auto",
  )
