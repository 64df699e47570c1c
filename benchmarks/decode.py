"""Decoding on this machine: time of one generated token and cache bytes against the context.

    python benchmarks/decode.py                  # contexts 1k ... 32k
    python benchmarks/decode.py --contexts 1024 4096 --repeats 3

For each variant, a `DecoderLM` (embed 256, 4 heads of 64, 2 layers, no MLP, float32) whose
every layer is that variant gets a cache holding `context` tokens, then one jitted `decode`
step of a single token is timed (median of `--repeats` after a warm-up). The cache's
contents do not change the work of a step, so it is filled with random keys, values and
states rather than prefilled. Cache bytes are those of the arrays `init_cache` allocates for
`context + 1` tokens (recurrent states: their size after the first token). Softmax caches
grow with the context and its step reads them all; sliding-window caches keep a ring of the
window; linear-family and delta-rule caches are a constant state; `streaming` is the softmax
model under the StreamingLLM policy (4 sinks + 508 recent tokens: 512 rows per layer). Results:
`benchmarks/results/decode.json` and `decode.png`; a run of some `--variants` keeps the other
variants' records.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from attnjax import nn  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
VARIANTS = {
  "softmax": {},
  "sliding_window": {"window": 512},
  "gla": {},
  "based": {},
  "gated_deltanet": {},
  "streaming": {},
}
# Arms that are a cache policy on another variant's model: name -> (variant, policy).
POLICIES = {"streaming": ("softmax", nn.StreamingLLM(sink_tokens=4, window=508))}
EMBED, HEADS, DEPTH = 256, 4, 2


def model(name: str) -> nn.DecoderLM:
  options = VARIANTS[name]
  name = POLICIES.get(name, (name, None))[0]
  return nn.DecoderLM(
    vocab_size=256, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, mlp_dim=0,
    layer_pattern=name, mixer_options={name: options} if options else None,
    rngs=nnx.Rngs(0),
  )  # fmt: skip


def filled_cache(lm: nn.DecoderLM, context: int, policy=None) -> dict:
  """A cache of `context` tokens with random contents (recurrent states from one token)."""
  cache = lm.init_cache(1, context + 1, policy=policy)
  _, cache = lm.decode(jnp.zeros((1, 1), jnp.int32), cache)  # gives recurrent states shapes
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(cache["layers"]))))

  def random_like(x):
    return jax.random.normal(next(keys), x.shape, jnp.float32).astype(x.dtype) * 0.1

  return {**cache, "layers": jax.tree.map(random_like, cache["layers"]),
          "position": jnp.asarray(context, jnp.int32)}  # fmt: skip


def measure(name: str, context: int, repeats: int) -> dict:
  lm = model(name)
  graphdef, params = nnx.split(lm)
  step = jax.jit(lambda params, cache, token: nnx.merge(graphdef, params).decode(token, cache))
  cache = filled_cache(lm, context, POLICIES.get(name, (None, None))[1])
  token = jnp.zeros((1, 1), jnp.int32)
  jax.block_until_ready(step(params, cache, token))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, cache, token))
    times.append(time.perf_counter() - start)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))
  seconds = statistics.median(times)
  return {
    "variant": name,
    "context": context,
    "seconds_per_token": seconds,
    "tokens_per_s": 1 / seconds,
    "cache_bytes": cache_bytes,
  }


def plot(records: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in VARIANTS:
    rows = [r for r in records if r["variant"] == name]
    contexts = [r["context"] for r in rows]
    axes[0].plot(contexts, [r["seconds_per_token"] * 1e3 for r in rows], "o-", label=name)
    axes[1].plot(contexts, [r["cache_bytes"] / 2**20 for r in rows], "o-", label=name)
  axes[0].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per token")
  axes[1].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"one decode step, {DEPTH} layers x {HEADS} heads x 64, {jax.devices()[0]}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--contexts", type=int, nargs="*", default=[1024 * 2**i for i in range(6)])
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  names = args.variants.split(",")
  out = RESULTS / "decode.json"
  records = []
  if out.exists():
    records = [r for r in json.loads(out.read_text())["records"] if r["variant"] not in names]
  for name in names:
    for context in args.contexts:
      records.append(measure(name, context, args.repeats))
      print(json.dumps(records[-1]), flush=True)
  meta = {"device": str(jax.devices()[0]), "cpus": os.cpu_count(), "embed": EMBED,
          "heads": HEADS, "depth": DEPTH, "repeats": args.repeats, "options": VARIANTS,
          "policies": {k: repr(p) for k, (_, p) in POLICIES.items()}}  # fmt: skip
  RESULTS.mkdir(exist_ok=True)
  records.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["context"]))
  out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
  plot(records, RESULTS / "decode.png")
  for name in VARIANTS:
    rows = [r for r in records if r["variant"] == name]
    print(
      f"{name:15s} "
      + "  ".join(f"{r['context']}: {r['seconds_per_token'] * 1e3:.2f} ms" for r in rows)
    )


if __name__ == "__main__":
  main()
