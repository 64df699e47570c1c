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
model under the StreamingLLM policy (4 sinks + 508 recent tokens: 512 rows per layer);
`recycled` is it under RecycledAttention (stride 10, top 256 keys per kv head): its time per
token is the mean over a stride of 9 recycled steps and one full step, both timed; `tidal` is it
under TidalDecode (layer 0 selects 256 positions, layer 1 attends to them). Results:
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
  "recycled": {},
  "tidal": {},
}
# Arms that are a cache policy on another variant's model: name -> (variant, policy).
POLICIES = {
  "streaming": ("softmax", nn.StreamingLLM(sink_tokens=4, window=508)),
  "recycled": ("softmax", nn.RecycledAttention(stride=10, top_k=256)),
  "tidal": ("softmax", nn.TidalDecode(top_k=256, selection_layers=(0,))),
}
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

  layers = jax.tree.map(random_like, cache["layers"])
  if isinstance(policy, nn.RecycledAttention):  # kept positions, the last full step just before
    layers = tuple(
      {**layer, "full_at": jnp.asarray(context - 1, jnp.int32),
       "selected": jax.random.randint(jax.random.key(i), layer["selected"].shape, 0, context)}
      for i, layer in enumerate(layers)
    )  # fmt: skip
  return {**cache, "layers": layers, "position": jnp.asarray(context, jnp.int32)}


def rewound(cache: dict, context: int, full_at: int | None = None) -> dict:
  """`cache` at `context` tokens again (and a RecycledAttention cache's last full step at
  `full_at`: `context - 1` makes the next step recycled, -1 full)."""
  layers = cache["layers"]
  if full_at is not None:
    layers = tuple({**layer, "full_at": jnp.asarray(full_at, jnp.int32)} for layer in layers)
  return {**cache, "layers": layers, "position": jnp.asarray(context, jnp.int32)}


def measure(name: str, context: int, repeats: int) -> dict:
  lm = model(name)
  graphdef, params = nnx.split(lm)
  # The cache is donated and updated in place, as `generate` does.
  step = jax.jit(
    lambda params, cache, token: nnx.merge(graphdef, params).decode(token, cache),
    donate_argnums=1,
  )
  policy = POLICIES.get(name, (None, None))[1]
  cache = filled_cache(lm, context, policy)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))
  token = jnp.zeros((1, 1), jnp.int32)

  def median_step(cache, full_at=None):
    """Median time of a step from `context` tokens; returns it and the cache."""
    times = []
    for i in range(repeats + 1):  # the first compiles
      cache = rewound(cache, context, full_at)
      start = time.perf_counter()
      _, cache = jax.block_until_ready(step(params, cache, token))
      times.append(time.perf_counter() - start) if i else None
    return statistics.median(times), cache

  record = {"variant": name, "context": context}
  if isinstance(policy, nn.RecycledAttention):  # per token over a stride: one full step
    recycled, cache = median_step(cache, full_at=context - 1)
    full, cache = median_step(cache, full_at=-1)
    record |= {"recycled_step_s": recycled, "full_step_s": full}
    seconds = ((policy.stride - 1) * recycled + full) / policy.stride
  else:
    seconds, cache = median_step(cache)
  return record | {
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
