"""`sequence_parallel`: one switch from a single-device attention op to a sharded one.

    attn = sequence_parallel(attnjax.ops.dot_product_attention, mesh, strategy="ring")
    out = attn(q, k, v, mask=masks.causal())           # q, k, v: global [b, T, h, d] arrays

The returned function has the op's signature, takes global arrays (sharded or not), shards
their sequence dimension over the mesh axis `axis` itself (and their batch over `batch_axes`)
and returns global arrays sharded the same way.

Strategies by family:
  softmax (`dot_product_attention`): "ring" (zigzag by default), "allgather", "ulysses";
  linear (`linear_attention`): "lasp2", "zeco".
"lasp2h" (hybrid models, LASP-2H) is "allgather" for softmax ops and "lasp2" for linear ops.
`op` may also be a `functools.partial` of either op, a registered variant that only presets
their keywords (`"gla"`, `"linear"`, `"based"`: the keywords become defaults), a mask preset
of `dot_product_attention` (`"softmax"`, `"sliding_window"`, `"chunked"`, `"prefix_lm"`: its
options, e.g. `window=`, become the mask) or, for "ulysses" only, any registered softmax
variant (it fixes its own mask out of sight, which the other strategies must shift per
chunk). The constant-decay linear variants ("lightning", "retention") compute their per-head
decay from the head count (`attnjax.ops.linear.variants.DECAY_PRESETS`), which every shard
receives.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax import registry
from attnjax.ops.linear import linear_attention
from attnjax.ops.linear import variants as linear_variants
from attnjax.ops.softmax import dot_product_attention, variants
from attnjax.parallel import allgather, blocks, lasp2, ring, ulysses, zeco
from attnjax.parallel import mesh as mesh_lib

SOFTMAX_STRATEGIES: dict[str, Callable] = {
  "ring": ring.attention,
  "allgather": allgather.attention,
  "ulysses": ulysses.attention,
  "lasp2h": allgather.attention,
}
LINEAR_STRATEGIES: dict[str, Callable] = {
  "lasp2": lasp2.linear_attention,
  "zeco": zeco.linear_attention,
  "lasp2h": lasp2.linear_attention,
}
DEFAULT_STRATEGY = {"softmax": "ring", "linear": "lasp2"}

# Keyword arguments of each op, read from its signature.
_SOFTMAX_ARGS = frozenset(inspect.signature(dot_product_attention).parameters) - {"q", "k", "v"}
_LINEAR_ARGS = frozenset(inspect.signature(linear_attention).parameters) - {"q", "k", "v"}


def _resolve(op) -> tuple[Callable, str, Callable[[dict, int], dict], bool]:
  """(base op, family, (call keywords, query heads) -> base op keywords, opaque) of `op`.

  Opaque: a softmax variant that fixes its mask out of sight (only ulysses can run it).
  """
  if isinstance(op, str):
    op = registry.get(op)
  fixed: dict = {}
  if isinstance(op, registry.Variant) and (
    op.op in (dot_product_attention, linear_attention)
    or op.op in variants.MASK_PRESETS
    or op.op in linear_variants.DECAY_PRESETS
  ):
    op, fixed = op.op, dict(op.defaults)  # a variant that only presets keywords of a base op
  while isinstance(op, functools.partial):
    fixed = {**op.keywords, **fixed}
    if op.args:
      raise ValueError(f"op may be a partial with keywords only, got positional args {op.args}")
    op = op.func
  if isinstance(op, registry.Variant):  # a variant computing more than a base op: opaque
    if op.family != "softmax":
      raise _unsupported(op)
    return op.op, "softmax", lambda kwargs, heads: {**op.defaults, **kwargs}, True

  def merged(kwargs: dict, heads: int) -> dict:
    return {**fixed, **kwargs}

  if op in variants.MASK_PRESETS:  # its options (e.g. window=) become the call's mask
    return (
      dot_product_attention,
      "softmax",
      lambda kwargs, heads: variants.preset_call(op, merged(kwargs, heads)),
      False,
    )
  if op in linear_variants.DECAY_PRESETS:  # a decay computed from the head count
    return (
      linear_attention,
      "linear",
      lambda kwargs, heads: linear_variants.decay_preset_call(op, heads, merged(kwargs, heads)),
      False,
    )
  if op is dot_product_attention:
    return op, "softmax", merged, False
  if op is linear_attention:
    return op, "linear", merged, False
  raise _unsupported(op)


def _unsupported(op) -> ValueError:
  return ValueError(
    f"sequence_parallel supports attnjax.ops.dot_product_attention, "
    f"attnjax.ops.linear_attention, keyword partials, variants presetting their keywords "
    f"(e.g. 'gla', 'linear', 'based'), the mask presets ('softmax', 'sliding_window', "
    f"'chunked', 'prefix_lm') and, with strategy 'ulysses', any softmax variant; "
    f"got {getattr(op, 'name', op)!r}"
  )


def sequence_parallel(
  op: Callable | str,
  mesh: jax.sharding.Mesh,
  axis: str = "seq",
  strategy: str | None = None,
  *,
  batch_axes: mesh_lib.BatchAxes = None,
  **strategy_options,
) -> Callable:
  """`op` with its sequence dimension sharded over `mesh` axis `axis`.

  Args:
    op: `dot_product_attention`, `linear_attention`, a keyword `functools.partial` of one,
      a variant (or its registry name) presetting their keywords, a mask preset (its op or
      name, e.g. "sliding_window"), or (ulysses only) any softmax variant.
    mesh: a `jax.sharding.Mesh` with axis `axis`.
    axis: the mesh axis the sequence is split over.
    strategy: see the module docstring; None: "ring" for softmax, "lasp2" for linear.
    batch_axes: mesh axes the batch dimension is split over (e.g. ("data", "fsdp")).
    **strategy_options: `zigzag=False` (ring: contiguous shards), `pieces=` (zeco).

  Returns:
    A function with `op`'s signature on global arrays.
  """
  func, family, prepare, opaque = _resolve(op)
  strategies = SOFTMAX_STRATEGIES if family == "softmax" else LINEAR_STRATEGIES
  strategy = DEFAULT_STRATEGY[family] if strategy is None else strategy
  if strategy not in strategies:
    raise ValueError(
      f"strategy {strategy!r} is not a {family} strategy; choose one of {sorted(strategies)}"
    )
  if opaque and strategy != "ulysses":
    raise ValueError(
      f"strategy {strategy!r} must shift the mask per chunk and needs "
      f"functools.partial(dot_product_attention, mask=...) or a mask preset rather than "
      f"{func.__name__!r}; only 'ulysses' takes a variant as it is"
    )
  mesh_lib.axis_size(mesh, axis)
  options = {"mesh": mesh, "axis": axis, "batch_axes": batch_axes, **strategy_options}
  # Static arguments (the call's mask and options) are hashable, so eager calls reuse the
  # compiled computation; under an outer jit this inlines.
  run = functools.partial(strategies[strategy], **options)
  if family == "softmax":
    wrapped = _softmax(func, prepare, jax.jit(run, static_argnums=0))
  else:
    wrapped = _linear(func, prepare, jax.jit(run, static_argnums=0, static_argnames="op_kwargs"))
  wrapped.__doc__ = (
    f"{strategy} sequence-parallel form of {getattr(func, '__name__', func)} over mesh axis "
    f"{axis!r}.\n\n{func.__doc__ or ''}"
  )
  return wrapped


def _check_args(kwargs: dict, allowed: frozenset, name: str) -> None:
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise TypeError(f"{name} got unexpected keyword arguments {unknown}")


def _softmax(op: Callable, prepare: Callable[[dict, int], dict], run: Callable) -> Callable:
  def attention(q, k, v, **kwargs):
    kwargs = prepare(kwargs, q.shape[2])
    _check_args(kwargs, _SOFTMAX_ARGS, "dot_product_attention")
    mask = kwargs.pop("mask", None)
    segment_ids = kwargs.pop("segment_ids", None)
    sinks = kwargs.pop("sinks", None)
    q_offset = kwargs.pop("q_offset", 0)
    return_lse = kwargs.pop("return_lse", False)
    if not isinstance(q_offset, int | np.integer) or q_offset < 0:
      raise ValueError(f"q_offset must be a non-negative int, got q_offset={q_offset!r}")
    if sinks is not None:
      sinks = jnp.asarray(sinks)
      if sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must have shape [heads] = ({q.shape[2]},), got {sinks.shape}")
    seg_q, seg_kv, padding_id = _segments(segment_ids, q.shape[:2])
    options = tuple(sorted(kwargs.items()))
    call = blocks.SoftmaxCall(op, mask, options, int(q_offset), padding_id)
    out, lse = run(call, q, k, v, seg_q, seg_kv, sinks)
    return (out, lse) if return_lse else out

  return attention


def _segments(segment_ids, batch_seq: tuple[int, int]):
  """(q ids, kv ids, padding id) from an int `[batch, seq]` array or `masks.SegmentIds`."""
  if segment_ids is None:
    return None, None, None
  if not isinstance(segment_ids, masks_lib.SegmentIds):
    segment_ids = masks_lib.SegmentIds(jnp.asarray(segment_ids))
  q_ids, kv_ids = jnp.asarray(segment_ids.q), jnp.asarray(segment_ids.kv_ids)
  for name, ids in (("segment_ids.q", q_ids), ("segment_ids.kv", kv_ids)):
    if ids.shape != batch_seq:
      raise ValueError(f"{name} must be [batch, seq] = {batch_seq}, got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32), segment_ids.padding_id


def _linear(op: Callable, prepare: Callable[[dict, int], dict], run: Callable) -> Callable:
  def attention(q, k, v, **kwargs):
    kwargs = prepare(kwargs, q.shape[2])
    _check_args(kwargs, _LINEAR_ARGS, "linear_attention")
    log_decay = kwargs.pop("log_decay", None)
    initial_state = kwargs.pop("initial_state", None)
    return_final_state = kwargs.pop("return_final_state", False)
    if not kwargs.get("causal", True):
      raise ValueError(
        "sequence-parallel linear attention supports causal=True only (a bidirectional "
        "layer needs every token to read the global final state: run it unsharded)"
      )
    if log_decay is not None:
      log_decay = jnp.asarray(log_decay)
      if log_decay.ndim in (3, 4) and log_decay.shape[:2] != q.shape[:2]:
        raise ValueError(
          f"log_decay must be [heads], [batch, seq, heads] or [batch, seq, heads, key_dim] "
          f"with [batch, seq] = {q.shape[:2]}, got shape {log_decay.shape}"
        )
    options = tuple(sorted(kwargs.items()))
    out, final_state = run(op, q, k, v, log_decay, initial_state, op_kwargs=options)
    return (out, final_state) if return_final_state else out

  return attention
