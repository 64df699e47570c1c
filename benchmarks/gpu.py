"""GPU timings of the Pallas kernels against cuDNN and jax's Mosaic GPU attention.

    bash benchmarks/gpu.sh                    # on a machine with an NVIDIA GPU, under 8 minutes
    python benchmarks/gpu.py --smoke --out /tmp/gpu   # tiny shapes on any backend (harness check)

Forward and forward+backward (the gradient of `sum(out)` with respect to every input) of each
kernel family, median of `--repeats` runs after a warm-up, at bfloat16, batch 2, 16 heads,
head_dim 128:

- block_sparse: `ops.dot_product_attention(impl="pallas")` with no mask, a causal and a
  sliding-window mask, against `jax.nn.dot_product_attention(implementation="cudnn")` (`is_causal`,
  `local_window_size`), jax's Mosaic GPU FlashAttention-3 (`pallas.ops.gpu.attention_mgpu`,
  no mask and causal) and, at the shorter length, XLA;
- chunked_linear (scalar and per-channel decay), delta_rule and neighborhood (a 2-D map):
  `impl="pallas"` against `impl="xla"`, with cuDNN causal softmax attention at the same
  sequence length as the yardstick.

Each family's records go to `benchmarks/results/gpu_<family>.json` (with the device kind) and
one table to stdout. An implementation that fails (e.g. the Mosaic GPU kernel on a pre-Hopper
GPU) is recorded with its error. Without a GPU the script exits with status 2 and says so;
`--smoke` runs the harness at tiny shapes on whatever backend there is, to check it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run as a script

import attnjax as aj  # noqa: E402
from benchmarks.block_sparse import timed  # noqa: E402  (median after a warm-up)

RESULTS = pathlib.Path(__file__).parent / "results"
NO_GPU = 2  # exit status without a GPU


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  seq: int
  heads: int
  head_dim: int


FULL = {"short": Shape(2, 4096, 16, 128), "long": Shape(2, 16384, 16, 128)}
SMOKE = {"short": Shape(1, 128, 2, 64), "long": Shape(1, 256, 2, 64)}
WINDOW = 1024


def _normal(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(shape: Shape, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  dims = (shape.batch, shape.seq, shape.heads, shape.head_dim)
  return tuple(_normal(key, dims) for key in keys)


def _cudnn(**kwargs):
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)


def _mosaic(causal: bool):
  def run(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(
      block_q=128, block_kv=128, max_concurrent_steps=2, causal=causal
    )
    return attention_mgpu.attention(q, k, v, config)

  return run


def softmax_cases(shapes):
  """(case, shape, {implementation: fn(q, k, v)}) for the block-sparse kernel."""
  causal, window = aj.masks.causal(), aj.masks.sliding_window(WINDOW - 1)

  def ours(mask, impl):
    return lambda q, k, v: aj.ops.dot_product_attention(q, k, v, mask=mask, impl=impl)

  yield (
    "full",
    shapes["short"],
    {
      "attnjax.pallas": ours(None, "pallas"),
      "cudnn": _cudnn(),
      "mosaic_gpu_fa3": _mosaic(causal=False),
    },
  )
  for name, shape in shapes.items():
    impls = {
      "attnjax.pallas": ours(causal, "pallas"),
      "cudnn": _cudnn(is_causal=True),
      "mosaic_gpu_fa3": _mosaic(causal=True),  # jax refuses causal on CUDA 12.8.0-12.9.0
    }
    if name == "short":
      impls["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    yield "causal", shape, impls
  shape = shapes["long"]
  yield (
    "sliding_window",
    shape,
    {
      "attnjax.pallas": ours(window, "pallas"),
      "cudnn": _cudnn(local_window_size=(WINDOW - 1, 0)),
    },
  )


def _log_decay(shape: Shape, per_channel: bool):
  dims = (shape.batch, shape.seq, shape.heads) + ((shape.head_dim,) if per_channel else ())
  return -jax.nn.softplus(jax.random.normal(jax.random.key(1), dims) - 2.0) / 8


def linear_cases(shapes):
  shape = shapes["long"]
  for name, per_channel in (("scalar_decay", False), ("per_channel_decay", True)):
    log_decay = _log_decay(shape, per_channel)

    def ours(impl, log_decay=log_decay):
      return lambda q, k, v: aj.ops.linear_attention(q, k, v, log_decay=log_decay, impl=impl)

    impls = {"attnjax.pallas": ours("pallas"), "attnjax.xla": ours("xla")}
    yield name, shape, impls | {"cudnn_causal_softmax": _cudnn(is_causal=True)}


def delta_rule_cases(shapes):
  shape = shapes["long"]
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.key(2), (shape.batch, shape.seq, shape.heads)))

  def ours(impl):
    def run(q, k, v):
      k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(k.dtype)
      return aj.ops.delta_rule_attention(q, k, v, beta, impl=impl)

    return run

  impls = {"attnjax.pallas": ours("pallas"), "attnjax.xla": ours("xla")}
  yield "deltanet", shape, impls | {"cudnn_causal_softmax": _cudnn(is_causal=True)}


def neighborhood_cases(shapes):
  """A square 2-D map of `long.seq` tokens, 13 x 13 neighborhoods."""
  shape = shapes["long"]
  side = int(shape.seq**0.5)

  def ours(impl):
    def run(q, k, v):
      grid = lambda x: x.reshape(shape.batch, side, side, shape.heads, shape.head_dim)  # noqa: E731
      out = aj.ops.neighborhood_attention(grid(q), grid(k), grid(v), kernel_size=13, impl=impl)
      return out.reshape(q.shape)

    return run

  impls = {"attnjax.pallas": ours("pallas"), "attnjax.xla": ours("xla")}
  yield "2d_13x13", shape, impls | {"cudnn_full_softmax": _cudnn()}


FAMILIES = {
  "block_sparse": softmax_cases,
  "chunked_linear": linear_cases,
  "delta_rule": delta_rule_cases,
  "neighborhood": neighborhood_cases,
}


def time_impl(fn: Callable, qkv: tuple, repeats: int) -> dict:
  """{"forward_ms", "forward_backward_ms"} of `fn`, or {"error"} where it fails."""

  def loss(q, k, v):
    return fn(q, k, v).astype(jnp.float32).sum()

  try:
    forward = timed(fn, qkv, repeats)
    both = timed(jax.grad(loss, argnums=(0, 1, 2)), qkv, repeats)
  except Exception as e:  # the failure is the result (unsupported GPU, no kernel here, ...)
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  return {"forward_ms": 1e3 * forward, "forward_backward_ms": 1e3 * both}


def run_family(family: str, shapes: dict, repeats: int) -> list[dict]:
  records = []
  for case, shape, impls in FAMILIES[family](shapes):
    qkv = _qkv(shape)
    for impl, fn in impls.items():
      record = {"family": family, "case": case, **dataclasses.asdict(shape), "impl": impl}
      record |= time_impl(fn, qkv, repeats)
      print(_row(record), flush=True)
      records.append(record)
  return records


def _row(r: dict) -> str:
  shape = f"b{r['batch']} T{r['seq']} h{r['heads']} d{r['head_dim']}"
  if "error" in r:
    return f"| {r['family']} | {r['case']} | {shape} | {r['impl']} | failed: {r['error'][:80]} | |"
  timings = f"{r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f}"
  return f"| {r['family']} | {r['case']} | {shape} | {r['impl']} | {timings} |"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
  parser.add_argument("--out", default=str(RESULTS), help="folder for gpu_<family>.json")
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu" and not args.smoke:
    print(
      f"benchmarks/gpu.py: no GPU (JAX backend is {jax.default_backend()!r}); nothing timed. "
      "Run it where jax sees a CUDA GPU, or pass --smoke to check the harness.",
      file=sys.stderr,
    )
    return NO_GPU
  device = jax.devices()[0]
  meta = {
    "device_kind": device.device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  print(f"{meta}\n| family | case | shape | implementation | forward ms | fwd+bwd ms |")
  print("|---|---|---|---|---|---|")
  for family in args.families.split(","):
    records = run_family(family, SMOKE if args.smoke else FULL, args.repeats)
    path = out / f"gpu_{family}.json"
    path.write_text(
      json.dumps({"meta": meta | {"smoke": args.smoke}, "records": records}, indent=1)
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
