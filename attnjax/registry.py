"""Variant registry: attention variants and their implementations, looked up by name.

A variant is declared once, by `register(name, op, ...)`: its pure op (which dispatches on
`impl=`), the implementations that op has, the keyword `defaults` the variant passes to it,
the NNX mixer that wraps it for models (`module`) and a typed description of what it can do
(`Capabilities`). Everything else is derived from that declaration: `reference` and `impls`
(the op with the defaults applied, as for a plain call), the one-token `step` of a variant
that carries a state, the README table, the presets of `configs/mqar.py`, which layers
`attnjax.parallel` can split and how. Nothing else keeps a list of variants.

Dispatch is by table, not by if/elif ladders: `dispatch(impls, impl, ...)` calls the named
implementation. Kernels are chosen by the platform the program is compiled for, not the
process's backend: `impl="pallas"` and `"auto"` lower the Mosaic kernel when compiled for TPU
(compile-only devices from a CPU host included), the Triton kernel for CUDA, and `"auto"`
lowers "xla" elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import jax
from jax.extend import core as jex_core
from jax.interpreters import mlir

from kernels_pallas import common as kernel_common

IMPL_NAMES = ("reference", "xla", "pallas", "pallas_interpret", "auto")
FAMILIES = ("softmax", "linear", "neighborhood")

# How a variant's layer splits under sequence parallelism (`Capabilities.split`):
#   "mask":  a mask preset of `dot_product_attention`; every softmax strategy (ring,
#            allgather, ulysses) shifts the preset's mask per chunk.
#   "state": a preset of `linear_attention`; LASP-2 and ZeCO pass per-device states.
#   "heads": any op of q, k, v and static keywords returning `(out, lse)`; Ulysses only (the
#            op runs whole sequences for a subset of heads).
#   "delta": a delta-rule op (`attnjax.ops.delta`); LASP-2 passes per-device (transition,
#            state) summaries (`attnjax.parallel.delta_rule`).
#   None:    not split (run it with `mesh.shape.seq=1`).
Split = Literal["mask", "state", "heads", "delta"]
SPLITS = ("mask", "state", "heads", "delta", None)


# An implementation cannot handle this call; `impl="auto"` tries the next one. Kernels raise it
# too (a shape their tiles cannot hold), so it lives with them.
Unsupported = kernel_common.Unsupported


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a variant's op does, declared at registration and checked by the registry test.

  Attributes:
    causal: a causal form exists: position t reads no input after t.
    bidirectional: a bidirectional form exists (every position may read every other).
    causal_keyword: the op takes `causal=` to choose between the two forms (the op's default,
      or the variant's `defaults`, gives the registered form); without it the variant is
      exactly one of the two.
    gqa: `k`, `v` may have fewer heads than `q`.
    mask: the op takes `mask=` (an `attnjax.masks.Mask`).
    segment_ids: the op takes `segment_ids=` (packed sequences attend within a segment).
    lse: the op takes `return_lse=True` and then returns `(out, lse [batch, q_len, heads])`.
    state: the op takes `initial_state=` and `return_final_state=True` (then returns
      `(out, state)`), so a sequence can run in pieces; the variant then has a `step`.
    spatial: inputs are `[batch, *spatial, heads, dim]` with 1 to 3 spatial axes.
    split: how the variant splits under sequence parallelism (see `SPLITS`).
  """

  causal: bool
  bidirectional: bool = False
  causal_keyword: bool = False
  gqa: bool = True
  mask: bool = False
  segment_ids: bool = False
  lse: bool = False
  state: bool = False
  spatial: bool = False
  split: Split | None = None

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got split={self.split!r}")
    if self.causal_keyword != (self.causal and self.bidirectional) or not (
      self.causal or self.bidirectional
    ):
      raise ValueError(
        "a variant is causal or bidirectional; it has both forms exactly when it takes a "
        "causal= keyword (causal_keyword=True)"
      )
    if self.split is not None and not self.causal:
      raise ValueError("only causal variants split under sequence parallelism")
    if self.split == "heads" and not self.lse:
      raise ValueError('split="heads" (Ulysses) needs an op that returns its lse')

  def causal_options(self) -> dict[str, bool] | None:
    """The keywords that make the op causal: `{}`, `{"causal": True}`, or None if none do.

    Mixers take the same `causal` option as their op, so a config can ask for a causal layer.
    """
    if not self.causal:
      return None
    return {"causal": True} if self.causal_keyword else {}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One registered attention variant (build it with `register`).

  Attributes:
    name: registry key, e.g. `"softmax"`, `"sliding_window"`.
    family: one of `FAMILIES`; sequence parallelism picks its strategy by family.
    paper: citation of the paper that defines the variant.
    op: public function with an `impl=` keyword that dispatches over its implementations.
    impl_names: the implementations `op` has (besides "auto").
    capabilities: what the op does (`Capabilities`).
    defaults: keyword arguments this variant passes to `op` (a mask, a window size).
    preset: for `split` "mask" / "state": `(call keywords, query heads) -> keywords` of the
      family's base op (`dot_product_attention` / `linear_attention`) that compute the same
      function, so sequence parallelism can run the base op's strategies on it.
    module: "package.module:Class" of the Flax NNX mixer (resolved lazily by `mixer_class`,
      since ops may not import `attnjax.nn`); it is constructed as
      `cls(embed_dim, *, num_heads, num_kv_heads=None, head_dim=None, variant=name, rngs,
      **options)` and called as `mixer(x[batch, seq, embed], *, segment_ids=None)`
      `-> [batch, seq, embed]`.
    description: one line for the README table.
    example: `(key, *, batch, seq, heads, kv_heads, head_dim) -> (args, kwargs)`, random
      arguments of a valid call (tests and benchmarks call every variant through it; None:
      q, k, v of those sizes, `kv_heads` only if `capabilities.gqa`).
    cached: the op over a decoding cache, `(q, k_cache, v_cache, *, q_start, kv_positions,
      **the variant's keywords) -> out` like `attnjax.ops.softmax.cached.cached_attention`,
      for a softmax-family variant that is not a mask of `dot_product_attention` but decodes
      with the base `Attention` mixer (None: mask variants use `cached_attention`).
  """

  name: str
  family: str
  paper: str
  op: Callable[..., Any]
  impl_names: tuple[str, ...]
  capabilities: Capabilities
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  preset: Callable[[dict, int], dict] | None = None
  module: str | None = None
  description: str = ""
  example: Callable[..., tuple[tuple, dict]] | None = None
  cached: Callable[..., Any] | None = None

  def __call__(self, *args, **kwargs):
    op = self.op
    for hook in _CALL_HOOKS:
      op = hook(self, op)
    return op(*args, **{**self.defaults, **kwargs})

  @property
  def reference(self) -> Callable[..., Any]:
    """The float32 oracle: the variant called with `impl="reference"`."""
    return self.impls["reference"]

  @property
  def impls(self) -> Mapping[str, Callable[..., Any]]:
    """Implementation name -> the variant called with that `impl` (defaults applied)."""
    return {name: functools.partial(self, impl=name) for name in self.impl_names}

  def example_inputs(
    self, key: jax.Array, *, batch=2, seq=21, heads=4, kv_heads=2, head_dim=12
  ) -> tuple[tuple, dict]:
    """Random `(args, kwargs)` of a valid call of this variant (see `example`)."""
    kv_heads = kv_heads if self.capabilities.gqa else heads
    sizes = dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    if self.example is not None:
      return self.example(key, **sizes)
    return random_qkv(key, **sizes), {}

  def step(self, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, state=None, **kwargs):
    """One decoding token in constant memory: `(o_t [batch, heads, value_dim], new state)`.

    `q_t [batch, heads, head_dim]`, `k_t`, `v_t [batch, kv_heads, dim]`; `state` from the
    previous step or `op(..., return_final_state=True)`, None before the first token.
    Per-token keyword arrays (e.g. GLA's gate) keep a one-token sequence axis.
    """
    if not self.capabilities.state:
      raise ValueError(f"variant {self.name!r} carries no state and has no one-token step")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
      if x.ndim != 3:
        raise ValueError(f"{name} must be [batch, heads, dim] (one token), got shape {x.shape}")
    kwargs = {"impl": "reference", **kwargs, "initial_state": state, "return_final_state": True}
    out, state = self(q_t[:, None], k_t[:, None], v_t[:, None], **kwargs)
    return out[:, 0], state


def random_qkv(
  key: jax.Array, *, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Standard-normal float32 `q [batch, seq, heads, head_dim]`, `k`, `v [.., kv_heads, ..]`."""
  kq, kk, kv = jax.random.split(key, 3)
  return (
    jax.random.normal(kq, (batch, seq, heads, head_dim)),
    jax.random.normal(kk, (batch, seq, kv_heads, head_dim)),
    jax.random.normal(kv, (batch, seq, kv_heads, head_dim)),
  )


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


def register(
  name: str,
  op: Callable[..., Any],
  *,
  family: str,
  paper: str,
  description: str,
  capabilities: Capabilities,
  impls: Iterable[str] = ("reference", "xla"),
  defaults: Mapping[str, Any] | None = None,
  preset: Callable[[dict, int], dict] | None = None,
  module: str | None = None,
  example: Callable[..., tuple[tuple, dict]] | None = None,
  cached: Callable[..., Any] | None = None,
) -> Variant:
  """Declares variant `name` (see `Variant`); a name can be registered once.

  `impls` names the implementations `op` dispatches to (each must compute the reference's
  function); `defaults` are passed to `op` on every call, through every implementation.
  """
  impl_names = tuple(impls)
  if "reference" not in impl_names or not set(impl_names) <= set(IMPL_NAMES) - {"auto"}:
    raise ValueError(
      f"impls of {name!r} must include 'reference' and be among {IMPL_NAMES[:-1]}, got {impl_names}"
    )
  if family not in FAMILIES:
    raise ValueError(f"family of {name!r} must be one of {FAMILIES}, got {family!r}")
  if (capabilities.split in ("mask", "state")) != (preset is not None):
    raise ValueError(
      f'variant {name!r}: split="mask" or "state" needs a preset (its base-op keywords), and '
      f"a preset needs one of them; got split={capabilities.split!r}"
    )
  if name in _REGISTRY:
    raise ValueError(f"variant {name!r} is already registered")
  variant = Variant(
    name=name,
    family=family,
    paper=paper,
    op=op,
    impl_names=impl_names,
    capabilities=capabilities,
    defaults=dict(defaults or {}),
    preset=preset,
    module=module,
    description=description,
    example=example,
    cached=cached,
  )
  _REGISTRY[name] = variant
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


FALLBACK_ORDER = ("xla", "reference")


def dispatch(impls: Mapping[str, Callable[..., Any]], impl: str, *args, **kwargs):
  """Calls `impls[impl](*args, **kwargs)`, choosing kernels by the platform compiled for.

  "pallas" calls `impls["pallas"](..., kernel=...)` with the kernel of the platform the
  program is lowered for (`on_platform`): Mosaic for TPU, Triton for CUDA/ROCm, even for
  compile-only devices on a CPU host. "auto" does the same and lowers the first of "xla",
  "reference" for every other platform (and when a kernel raises `Unsupported`).
  """
  if impl not in IMPL_NAMES:
    raise ValueError(f"impl must be one of {IMPL_NAMES}, got impl={impl!r}")
  if impl == "auto":
    fallback = functools.partial(_first_supported, impls, args, kwargs)
    if "pallas" not in impls:
      return fallback()
    try:
      return on_platform(functools.partial(impls["pallas"], *args, **kwargs), fallback)
    except Unsupported:
      return fallback()
  if impl not in impls:
    raise Unsupported(f"impl={impl!r} is not available for this op; available: {sorted(impls)}")
  if impl == "pallas":
    return on_platform(functools.partial(impls["pallas"], *args, **kwargs))
  return impls[impl](*args, **kwargs)


def _first_supported(impls, args, kwargs):
  reasons = []
  for name in FALLBACK_ORDER:
    if name not in impls:
      continue
    try:
      return impls[name](*args, **kwargs)
    except Unsupported as e:
      reasons.append(f"{name}: {e}")
  raise Unsupported("no implementation can handle this call: " + "; ".join(reasons))


def on_platform(run_kernel: Callable[..., Any], otherwise: Callable[[], Any] | None = None):
  """`run_kernel(kernel=k)` for the platform the program is lowered for, else `otherwise()`.

  A `jax.lax.platform_dependent` over the kernels this process can compile
  (`kernels_pallas.common.compilable_kernels`): a program traced once lowers the Mosaic kernel
  for TPU, the Triton kernel for CUDA/ROCm and `otherwise` elsewhere. Only those kernels are
  traced, so a CPU process without compile-only TPU devices traces `otherwise` alone. With
  `otherwise=None` a platform without a kernel is an error: `Unsupported` at once when no
  kernel compiles here, else at lowering, naming the platform.
  """
  kernels = kernel_common.compilable_kernels()
  if not kernels:
    if otherwise is not None:
      return otherwise()
    raise Unsupported(
      "impl='pallas': no Pallas kernel compiles on this installation (JAX backend "
      f"{jax.default_backend()!r}; kernels need a TPU or GPU backend, or compile-only devices "
      "made before tracing: attnjax.aot.tpu_devices with libtpu, or a CUDA plugin); "
      "impl='pallas_interpret' runs the TPU kernel in the interpreter"
    )
  branches = {
    platform: functools.partial(run_kernel, kernel=kernel)
    for kernel in kernels
    for platform in kernel_common.PLATFORMS[kernel]
  }
  if otherwise is None:
    shapes = jax.eval_shape(branches[kernel_common.PLATFORMS[kernels[0]][0]])
    otherwise = functools.partial(_no_kernel, shapes, tuple(branches))
  return jax.lax.platform_dependent(**branches, default=otherwise)


def _no_kernel(shapes, platforms: tuple[str, ...]):
  """Outputs shaped like `shapes` whose lowering fails: impl="pallas" on a kernel-less platform."""
  leaves, tree = jax.tree.flatten(shapes)
  avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)
  return jax.tree.unflatten(tree, _no_kernel_p.bind(avals=avals, platforms=platforms))


def _no_kernel_error(platforms: tuple[str, ...], compiled_for) -> Unsupported:
  return Unsupported(
    f"impl='pallas': the Pallas kernels are for the platforms {platforms}, but this program "
    f"runs on {compiled_for}; use impl='auto' or 'xla' (or 'pallas_interpret' for the interpreter)"
  )


def _no_kernel_eager(*, avals, platforms):
  raise _no_kernel_error(platforms, jax.default_backend())


def _no_kernel_lowering(ctx, *, avals, platforms):
  raise _no_kernel_error(platforms, ctx.module_context.platforms)


_no_kernel_p = jex_core.Primitive("attnjax_no_pallas_kernel")
_no_kernel_p.multiple_results = True
_no_kernel_p.def_abstract_eval(lambda *, avals, platforms: avals)
_no_kernel_p.def_impl(_no_kernel_eager)
mlir.register_lowering(_no_kernel_p, _no_kernel_lowering)


def markdown_table() -> str:
  """The README's table of registered variants, generated from the registry."""
  rows = [
    "| name | family | implementations | capabilities | paper | description |",
    "|---|---|---|---|---|---|",
  ]
  for name in names():
    v = _REGISTRY[name]
    impls = ", ".join(["reference", *sorted(k for k in v.impl_names if k != "reference")])
    rows.append(
      f"| `{name}` | {v.family} | {impls} | {capability_summary(v.capabilities)} | {v.paper} "
      f"| {v.description} |"
    )
  return "\n".join(rows)


def capability_summary(capabilities: Capabilities) -> str:
  """A short list of what a variant does, e.g. `causal, gqa, state, split: state`."""
  flags = [
    field.name
    for field in dataclasses.fields(capabilities)
    if field.name not in ("causal_keyword", "split") and getattr(capabilities, field.name)
  ]
  if capabilities.split is not None:
    flags.append(f"split: {capabilities.split}")
  return ", ".join(flags)


@functools.cache
def _load_builtin_variants() -> None:
  """Imports every module under `attnjax.ops`: a variant registers where its op is defined,
  so a new op file is found without being listed anywhere."""
  import attnjax.ops

  for module in pkgutil.walk_packages(attnjax.ops.__path__, "attnjax.ops."):
    importlib.import_module(module.name)


README_START, README_END = "<!-- variants:start -->", "<!-- variants:end -->"


def update_readme(text: str) -> str:
  """`text` with the part between the variants markers replaced by `markdown_table()`."""
  head, _, rest = text.partition(README_START)
  _, _, tail = rest.partition(README_END)
  return f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}"
