"""Variant registry: attention variants and their implementations, looked up by name.

A `Variant` bundles the pure op of an attention mechanism (`op`, which dispatches on
`impl=`), its float32 oracle (`reference`), its fast implementations (`impls`), the NNX
mixer module that wraps it for models (`module`) and what it supports (`capabilities`).

Dispatch is by table, not by if/elif ladders: `dispatch(impls, impl, ...)` calls the named
implementation; with `impl="auto"` it tries the implementations in `auto_order()` and moves
on when one raises `Unsupported` (a call it cannot handle, e.g. a Pallas kernel on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

IMPL_NAMES = ("reference", "xla", "pallas", "pallas_interpret", "auto")


class Unsupported(ValueError):  # noqa: N818 - reads better at raise sites: `raise Unsupported(...)`
  """An implementation cannot handle this call; `impl="auto"` tries the next one."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One registered attention variant.

  Attributes:
    name: registry key, e.g. `"softmax"`, `"sliding_window"`.
    family: `"softmax"`, `"linear"`, `"neighborhood"`, ...
    paper: citation of the paper that defines the variant.
    reference: the float32 oracle, same signature as `op` minus `impl`.
    impls: implementation name -> callable, every one computing `reference`'s function.
    op: public function with an `impl=` keyword that dispatches over `impls`.
    module: "package.module:Class" of the Flax NNX mixer (resolved lazily by `mixer_class`,
      since ops may not import `attnjax.nn`); it is constructed as
      `cls(embed_dim, *, num_heads, num_kv_heads=None, head_dim=None, variant=name, rngs,
      **options)` and called as `mixer(x[batch, seq, embed], *, segment_ids=None)`
      `-> [batch, seq, embed]`.
    capabilities: what the op supports, e.g. `{"mask", "segment_ids", "gqa", "lse"}`.
    defaults: keyword arguments this variant passes to `op` (a mask preset, a window size).
    description: one line for the README table.
  """

  name: str
  family: str
  paper: str
  reference: Callable[..., Any]
  impls: Mapping[str, Callable[..., Any]]
  op: Callable[..., Any]
  module: str | None = None
  capabilities: frozenset[str] = frozenset()
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""

  def __call__(self, *args, **kwargs):
    op = self.op
    for hook in _CALL_HOOKS:
      op = hook(self, op)
    return op(*args, **{**self.defaults, **kwargs})


# Active `intercept` hooks, innermost last.
_CALL_HOOKS: list[Callable[[Variant, Callable], Callable]] = []


@contextlib.contextmanager
def intercept(hook: Callable[[Variant, Callable], Callable]) -> Iterator[None]:
  """Within the block, calling a `Variant` runs `hook(variant, op)` instead of its `op`.

  The observation point for analysis tools (`attnjax.analysis`): models call their attention
  through `registry.get(name)(...)`, so a hook sees every layer's op and its arguments (the
  variant's `defaults` included) without any change to model code. Applies to calls traced
  inside the block; nested blocks wrap the outer hook's result.
  """
  _CALL_HOOKS.append(hook)
  try:
    yield
  finally:
    _CALL_HOOKS.remove(hook)


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
  """Adds `variant` under `variant.name`; a name can be registered once."""
  if variant.name in _REGISTRY and _REGISTRY[variant.name] is not variant:
    raise ValueError(f"variant {variant.name!r} is already registered")
  _REGISTRY[variant.name] = variant
  return variant


def get(name: str) -> Variant:
  """The variant registered as `name`; a `ValueError` lists the known names otherwise."""
  _load_builtin_variants()
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown attention variant {name!r}; registered: {names()}") from None


def names() -> list[str]:
  """Sorted names of all registered variants."""
  _load_builtin_variants()
  return sorted(_REGISTRY)


def mixer_class(name: str) -> type:
  """The NNX mixer class of variant `name` (imports it on first use)."""
  variant = get(name)
  if variant.module is None:
    raise ValueError(f"variant {name!r} has no NNX module")
  module_name, _, class_name = variant.module.partition(":")
  return getattr(importlib.import_module(module_name), class_name)


def auto_order(backend: str | None = None) -> tuple[str, ...]:
  """Implementations `impl="auto"` tries, fastest first, for `backend` (default: JAX's)."""
  backend = backend or jax.default_backend()
  if backend in ("tpu", "gpu", "cuda", "rocm"):
    return ("pallas", "xla", "reference")
  return ("xla", "reference")


def dispatch(impls: Mapping[str, Callable[..., Any]], impl: str, *args, **kwargs):
  """Calls `impls[impl](*args, **kwargs)`; `"auto"` tries `auto_order()` past `Unsupported`."""
  if impl not in IMPL_NAMES:
    raise ValueError(f"impl must be one of {IMPL_NAMES}, got impl={impl!r}")
  if impl != "auto":
    if impl not in impls:
      raise Unsupported(f"impl={impl!r} is not available for this op; available: {sorted(impls)}")
    return impls[impl](*args, **kwargs)
  reasons = []
  for name in auto_order():
    if name not in impls:
      continue
    try:
      return impls[name](*args, **kwargs)
    except Unsupported as e:
      reasons.append(f"{name}: {e}")
  raise Unsupported("no implementation can handle this call: " + "; ".join(reasons))


def markdown_table() -> str:
  """The README's table of registered variants, generated from the registry."""
  rows = [
    "| name | family | implementations | paper | description |",
    "|---|---|---|---|---|",
  ]
  for name in names():
    v = _REGISTRY[name]
    impls = ", ".join(["reference", *sorted(k for k in v.impls if k != "reference")])
    rows.append(f"| `{name}` | {v.family} | {impls} | {v.paper} | {v.description} |")
  return "\n".join(rows)


def _load_builtin_variants() -> None:
  # Registration happens when an op module is imported; importing the ops package loads all.
  import attnjax.ops  # noqa: F401


README_START, README_END = "<!-- variants:start -->", "<!-- variants:end -->"


def update_readme(text: str) -> str:
  """`text` with the part between the variants markers replaced by `markdown_table()`."""
  head, _, rest = text.partition(README_START)
  _, _, tail = rest.partition(README_END)
  return f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}"
