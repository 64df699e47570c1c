"""`sequence_parallel`: one switch from a single-device attention op to a sharded one.

    attn = sequence_parallel(attnjax.ops.dot_product_attention, mesh, strategy="ring")
    out = attn(q, k, v, mask=masks.causal())           # q, k, v: global [b, T, h, d] arrays

The returned function has the op's signature, takes global arrays (sharded or not), shards
their sequence dimension over the mesh axis `axis` itself (and their batch over `batch_axes`)
and returns global arrays sharded the same way.

Strategies by family:
  softmax (`dot_product_attention`): "ring" (zigzag by default), "allgather", "ulysses";
  linear (`linear_attention`): "lasp2", "zeco";
  delta rule (`delta_rule_attention` and its variants): "lasp2", "zeco".
"lasp2h" (hybrid models, LASP-2H) is "allgather" for softmax ops and "lasp2" for linear ops.
Arrays are in natural order; ring also takes them in its zigzag layout (`layout="zigzag"`,
see `attnjax.parallel.layout`), as a model that lays its tokens out once passes them.
`op` may also be a `functools.partial` of either op, or a registered variant (its name, the
`Variant`, or a keyword partial of its op) whose `capabilities.split` says how it splits:
"mask" (the mask presets "softmax", "sliding_window", ...: their options, e.g. `window=`,
become the mask of `dot_product_attention`), "state" (variants presetting `linear_attention`'s
keywords or a per-head decay computed from the head count, which every shard receives), or
"heads" (Ulysses only: the variant's own op runs whole sequences for a subset of heads), or
"delta" (the delta-rule variants: their own op runs each shard from the state LASP-2 passes).
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
from attnjax.ops.delta import delta_rule_attention
from attnjax.ops.linear import linear_attention
from attnjax.ops.softmax import dot_product_attention
from attnjax.parallel import allgather, chunk_pairs, delta_rule, lasp2, ring, ulysses, zeco
from attnjax.parallel import layout as layout_lib
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
DELTA_STRATEGIES: dict[str, Callable] = {
  "lasp2": delta_rule.delta_rule_attention,
  "zeco": zeco.delta_rule_attention,
  "lasp2h": delta_rule.delta_rule_attention,
}
STRATEGIES = {"softmax": SOFTMAX_STRATEGIES, "linear": LINEAR_STRATEGIES, "delta": DELTA_STRATEGIES}
DEFAULT_STRATEGY = {"softmax": "ring", "linear": "lasp2", "delta": "lasp2"}

# Keyword arguments of each op, read from its signature.
_SOFTMAX_ARGS = frozenset(inspect.signature(dot_product_attention).parameters) - {"q", "k", "v"}
_LINEAR_ARGS = frozenset(inspect.signature(linear_attention).parameters) - {"q", "k", "v"}
_DELTA_ARGS = frozenset(inspect.signature(delta_rule_attention).parameters) - {"q", "k", "v"}


def _resolve(op) -> tuple[Callable, str, Callable[[dict, int], dict], bool]:
  """(base op, family, (call keywords, query heads) -> base op keywords, opaque) of `op`.

  A registered variant is read from its capabilities: split "mask" / "state" runs the base op
  on the keywords its `preset` gives; split "heads" runs the variant's own op, opaquely (only
  Ulysses can: it never shifts a mask).
  """
  if isinstance(op, str):
    op = registry.get(op)
  if isinstance(op, registry.Variant):
    variant = op
    split = variant.capabilities.split
    if split is None:
      raise _unsupported(variant.name)
    if split in ("heads", "delta"):
      family = "softmax" if split == "heads" else "delta"
      opaque = split == "heads"
      return variant.op, family, lambda kwargs, heads: {**variant.defaults, **kwargs}, opaque
    base, family = BASE_OPS[split]
    return (
      base,
      family,
      lambda kwargs, heads: variant.preset({**variant.defaults, **kwargs}, heads),
      False,
    )
  fixed: dict = {}
  while isinstance(op, functools.partial):
    fixed = {**op.keywords, **fixed}
    if op.args:
      raise ValueError(f"op may be a partial with keywords only, got positional args {op.args}")
    op = op.func
  by_op = {variant.op: variant for variant in map(registry.get, registry.names())}
  if op in by_op and op not in (dot_product_attention, linear_attention):
    base, family, prepare, opaque = _resolve(by_op[op])
    return base, family, lambda kwargs, heads: prepare({**fixed, **kwargs}, heads), opaque

  def merged(kwargs: dict, heads: int) -> dict:
    return {**fixed, **kwargs}

  if op is dot_product_attention:
    return op, "softmax", merged, False
  if op is linear_attention:
    return op, "linear", merged, False
  if op is delta_rule_attention:
    return op, "delta", merged, False
  raise _unsupported(getattr(op, "__name__", op))


# The base op and family of each split that runs a base op's strategies.
BASE_OPS = {"mask": (dot_product_attention, "softmax"), "state": (linear_attention, "linear")}


def _unsupported(name) -> ValueError:
  splittable = [n for n in registry.names() if registry.get(n).capabilities.split is not None]
  return ValueError(
    f"sequence_parallel takes attnjax.ops.dot_product_attention, "
    f"attnjax.ops.linear_attention, keyword partials of them, and the variants whose "
    f"capabilities declare a split ({splittable}) or keyword partials of their ops; "
    f"got {name!r}"
  )


def sequence_parallel(
  op: Callable | str,
  mesh: jax.sharding.Mesh,
  axis: str = "seq",
  strategy: str | None = None,
  *,
  batch_axes: mesh_lib.BatchAxes = None,
  layout: layout_lib.Layout = "natural",
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
    layout: the order of the sequence in the arrays given and returned (see
      `attnjax.parallel.layout`): "natural", or "zigzag" (ring only: arrays already in the
      ring's balanced layout, so it sends only K/V).
    **strategy_options: `zigzag=False` (ring: contiguous shards), `pieces=` (zeco).

  Returns:
    A function with `op`'s signature on global arrays.
  """
  func, family, prepare, opaque = _resolve(op)
  strategies = STRATEGIES[family]
  strategy = DEFAULT_STRATEGY[family] if strategy is None else strategy
  if strategy not in strategies:
    raise ValueError(
      f"strategy {strategy!r} is not a {family} strategy; choose one of {sorted(strategies)}"
    )
  if opaque and strategy != "ulysses":
    raise ValueError(
      f"strategy {strategy!r} must shift the mask per chunk and needs "
      f"functools.partial(dot_product_attention, mask=...) or a mask preset rather than "
      f"{func.__name__!r}; only 'ulysses' takes a variant that splits by heads as it is"
    )
  mesh_lib.axis_size(mesh, axis)
  layout_lib.check_layout(layout)
  options = {"mesh": mesh, "axis": axis, "batch_axes": batch_axes, **strategy_options}
  if strategy == "ring":
    options["layout"] = layout
  elif layout != "natural":
    raise ValueError(
      f"strategy {strategy!r} takes the sequence in natural order; only 'ring' runs on "
      f"layout={layout!r}"
    )
  # Static arguments (the call's mask and options) are hashable, so eager calls reuse the
  # compiled computation; under an outer jit this inlines.
  run = functools.partial(strategies[strategy], **options)
  if family == "softmax":
    wrapped = _softmax(func, prepare, jax.jit(run, static_argnums=0))
  elif family == "delta":
    wrapped = _delta(func, prepare, jax.jit(run, static_argnums=0, static_argnames="op_kwargs"))
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
    call = chunk_pairs.SoftmaxCall(op, mask, options, int(q_offset), padding_id)
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


def _delta(op: Callable, prepare: Callable[[dict, int], dict], run: Callable) -> Callable:
  def attention(q, k, v, beta=None, **kwargs):
    kwargs = prepare(kwargs, q.shape[2])
    beta = kwargs.pop("beta", beta)
    _check_args(kwargs, _DELTA_ARGS, "delta_rule_attention")
    if beta is None:
      raise ValueError("delta_rule_attention needs beta [batch, seq, heads]")
    arrays = {
      name: kwargs.pop(name, None) for name in ("log_decay", "initial_state", "segment_ids")
    }
    return_final_state = kwargs.pop("return_final_state", False)
    per_token = q.shape[:3]
    for name, x in (("beta", beta), ("log_decay", arrays["log_decay"])):
      if x is not None and jnp.shape(x) != per_token:
        raise ValueError(
          f"{name} must be [batch, seq, heads] = {per_token}, got shape {jnp.shape(x)}"
        )
    ids = arrays["segment_ids"]
    if ids is not None and jnp.shape(ids) != q.shape[:2]:
      raise ValueError(f"segment_ids must be [batch, seq] = {q.shape[:2]}, got {jnp.shape(ids)}")
    options = tuple(sorted(kwargs.items()))
    out, final_state = run(op, q, k, v, jnp.asarray(beta), *arrays.values(), op_kwargs=options)
    return (out, final_state) if return_final_state else out

  return attention
