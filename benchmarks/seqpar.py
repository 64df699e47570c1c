"""Sequence-parallel strategies on 8 simulated CPU devices: communication and memory per device.

    python benchmarks/seqpar.py            # T = 16k, 64k, 256k (compile only) + wall time at 4k
    python benchmarks/seqpar.py --quick    # T = 16k only
    python benchmarks/seqpar.py --strategies=lasp2,zeco,ulysses   # a subset (a minute)
    python benchmarks/seqpar.py --strategies=delta_lasp2,delta_zeco \
      --model-strategies=delta_lasp2,delta_zeco --update   # rerun some, keep the other rows

The full run took about 30 minutes on 2 shared CPU cores, almost all of it compiling the ring
(P steps x 4 chunk pairs, each pair's branches compiled once, forward and backward).

For each strategy (softmax: ring on arrays in its zigzag layout, as a model that lays its
sequence out once passes them; ring_natural: a standalone ring call on natural-order arrays,
which moves q, k, v and the outputs into the zigzag layout and back; allgather, ulysses,
under a causal mask; linear: lasp2, zeco with a data-dependent scalar decay; the gated delta
rule: delta_lasp2, delta_zeco, beta 1/2 and the same decay) and sequence
length, one attention layer's forward and its training step (forward + backward) are
compiled for a mesh of 8 devices on the `seq` axis. From the compiled HLO
(`attnjax.parallel.comms`) it reads every collective and the bytes each device sends (loop
bodies multiplied by their trip counts); backward bytes are the training step's minus the
forward's. Peak memory per device is the compiled program's arguments + outputs +
temporaries, next to the same step compiled for one device. The table also gives each
strategy's theoretical minimum traffic. A second table compiles the forward of a `DecoderLM`
of `MODEL_DEPTH` layers of one strategy at the longest length and gives its bytes per layer,
the model's once-per-model relayout (ring: tokens into the zigzag layout, hidden states back)
included. Wall time is measured at T = 4096 on the *simulated* devices (8 virtual devices
sharing this machine's cores: it shows overheads, not speed-ups). Results:
`benchmarks/results/seqpar.json` and `seqpar.md`.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from attnjax import masks, nn  # noqa: E402
from attnjax.nn.seq_parallel import SeqParallel  # noqa: E402
from attnjax.ops import delta_rule_attention, dot_product_attention, linear_attention  # noqa: E402
from attnjax.parallel import comms, sequence_parallel  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
PARTS = 8
BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 8, 2, 32
# float32: the CPU backend runs bfloat16 collectives in float32, which would double the bytes.
DTYPE = jnp.float32
SOFTMAX = ("ring", "ring_natural", "allgather", "ulysses")
# name -> (strategy, options): ring as models call it, and on natural-order arrays.
OPTIONS = {
  "ring": ("ring", {"layout": "zigzag"}),
  "ring_natural": ("ring", {}),
  "delta_lasp2": ("lasp2", {}),
  "delta_zeco": ("zeco", {}),
}
LINEAR = ("lasp2", "zeco")
DELTA = ("delta_lasp2", "delta_zeco")
STATE = LINEAR + DELTA  # strategies passing states, on as many kv heads as query heads
MODEL_STRATEGIES = ("ring", "allgather", "ulysses", *STATE)
MODEL_DEPTH, MODEL_VOCAB = 4, 256


def _inputs(strategy: str, seq_len: int):
  kv_heads = HEADS if strategy in STATE else KV_HEADS
  q = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, HEAD_DIM), DTYPE)
  kv = jax.ShapeDtypeStruct((BATCH, seq_len, kv_heads, HEAD_DIM), DTYPE)
  return q, kv, kv


def _layer(strategy: str, mesh, seq_len: int):
  """(forward fn, training-step fn) of one attention layer; mesh None: one device."""
  log_decay = jnp.full((BATCH, seq_len, HEADS), -0.01, jnp.float32)
  if strategy in LINEAR:
    op = linear_attention
    kwargs = {"impl": "xla", "chunk_size": 64}

    def attend(q, k, v):
      return layer_op(q, k, v, log_decay=log_decay, **kwargs)
  elif strategy in DELTA:
    op = delta_rule_attention
    kwargs = {"impl": "xla", "chunk_size": 64}
    beta = jnp.full((BATCH, seq_len, HEADS), 0.5, jnp.float32)

    def attend(q, k, v):
      return layer_op(q, k, v, beta, log_decay=log_decay, **kwargs)
  else:
    op = dot_product_attention
    kwargs = {"impl": "xla", "mask": masks.causal()}

    def attend(q, k, v):
      return layer_op(q, k, v, **kwargs)

  if mesh is None:
    layer_op = op
  else:
    name, options = OPTIONS.get(strategy, (strategy, {}))
    layer_op = sequence_parallel(op, mesh, strategy=name, **options)

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)

  return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _peak_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def theoretical_bytes(strategy: str, seq_len: int) -> tuple[float, float]:
  """(forward, backward) bytes a device must send per layer, by the strategy's algorithm."""
  name = OPTIONS.get(strategy, (strategy, {}))[0]
  return comms.theoretical_bytes(
    name,
    num_devices=PARTS,
    batch=BATCH,
    seq_len=seq_len,
    heads=HEADS,
    kv_heads=HEADS if strategy in STATE else KV_HEADS,
    head_dim=HEAD_DIM,
    itemsize=jnp.dtype(DTYPE).itemsize,
    transitions=strategy in DELTA,
  )


def measure(strategy: str, seq_len: int, mesh) -> dict:
  shapes = _inputs(strategy, seq_len)
  forward, step = _layer(strategy, mesh, seq_len)
  fwd = forward.lower(*shapes).compile()
  train = step.lower(*shapes).compile()
  fwd_found = comms.collectives(fwd.as_text(), PARTS)
  train_found = comms.collectives(train.as_text(), PARTS)
  fwd_bytes = comms.bytes_sent_per_device(fwd_found, PARTS)
  train_bytes = comms.bytes_sent_per_device(train_found, PARTS)
  _, single_step = _layer(strategy, None, seq_len)
  single = single_step.lower(*shapes).compile()
  min_fwd, min_bwd = theoretical_bytes(strategy, seq_len)
  return {
    "strategy": strategy,
    "seq_len": seq_len,
    "forward_bytes_per_device": fwd_bytes,
    "backward_bytes_per_device": train_bytes - fwd_bytes,
    "theoretical_forward_bytes": min_fwd,
    "theoretical_backward_bytes": min_bwd,
    "peak_memory_per_device": _peak_bytes(train),
    "peak_memory_single_device": _peak_bytes(single),
    "forward_collectives": sorted(
      {f"{c.kind} {c.shape.split('{')[0]} x{c.runs}" for c in fwd_found}
    ),
  }


def _model(strategy: str, mesh) -> nn.DecoderLM:
  """A DecoderLM whose every layer runs `strategy` (softmax: causal "softmax"; linear: "linear";
  delta: "gated_deltanet")."""
  name = OPTIONS.get(strategy, (strategy, {}))[0]
  linear = strategy in STATE
  context = SeqParallel(mesh, **({"linear": name} if linear else {"softmax": name}))
  pattern = "gated_deltanet" if strategy in DELTA else "linear" if linear else "softmax"
  return nn.DecoderLM(
    vocab_size=MODEL_VOCAB,
    embed_dim=HEADS * HEAD_DIM,
    depth=MODEL_DEPTH,
    num_heads=HEADS,
    num_kv_heads=HEADS if linear else KV_HEADS,
    head_dim=HEAD_DIM,
    mlp_dim=0,
    layer_pattern=pattern,
    dtype=DTYPE,
    seq_parallel=context,
    rngs=nnx.Rngs(0),
  )


def measure_model(strategy: str, seq_len: int, mesh) -> dict:
  """Forward bytes per device per layer of a `MODEL_DEPTH`-layer model, its relayout included."""
  model = nnx.eval_shape(lambda: _model(strategy, mesh))
  graph, params = nnx.split(model)
  forward = jax.jit(lambda params, tokens: nnx.merge(graph, params)(tokens))
  tokens = jax.ShapeDtypeStruct((BATCH, seq_len), jnp.int32)
  found = comms.collectives(forward.lower(params, tokens).compile().as_text(), PARTS)
  per_layer = comms.bytes_sent_per_device(found, PARTS) / MODEL_DEPTH
  min_fwd, _ = theoretical_bytes(strategy, seq_len)
  return {
    "strategy": strategy,
    "seq_len": seq_len,
    "depth": MODEL_DEPTH,
    "layout": model.seq_parallel.layout,
    "forward_bytes_per_device_per_layer": per_layer,
    "theoretical_forward_bytes": min_fwd,
    "ratio_to_minimum": per_layer / min_fwd,
  }


def wall_time(strategy: str, seq_len: int, mesh, repeats: int = 3) -> dict:
  """Median seconds of a training step on the simulated devices and on one device."""
  key = jax.random.key(0)
  arrays = [
    jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype) for s in _inputs(strategy, seq_len)
  ]
  result = {}
  for name, m in (("simulated_8_devices_s", mesh), ("one_device_s", None)):
    _, step = _layer(strategy, m, seq_len)
    jax.block_until_ready(step(*arrays))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(*arrays))
      times.append(time.perf_counter() - start)
    result[name] = statistics.median(times)
  return result


def _mib(x: float) -> str:
  return f"{x / 2**20:.3f}"


def model_markdown(model_rows: list[dict]) -> list[str]:
  lines = [
    "",
    f"Forward of a {MODEL_DEPTH}-layer DecoderLM (embed {HEADS * HEAD_DIM}, no MLP) whose every "
    "layer runs the strategy: bytes sent per device per layer (MiB), the model's relayout "
    "into and out of its sequence layout included, vs the per-layer minimum.",
    "",
    "| strategy | T | layout | forward MiB / layer [min] | ratio to min |",
    "|---|---|---|---|---|",
  ]
  for r in model_rows:
    lines.append(
      f"| {r['strategy']} | {r['seq_len']} | {r['layout']} | "
      f"{_mib(r['forward_bytes_per_device_per_layer'])} [{_mib(r['theoretical_forward_bytes'])}]"
      f" | {r['ratio_to_minimum']:.3f} |"
    )
  return lines


def markdown(rows: list[dict], model_rows: list[dict], timings: dict, timing_len: int) -> str:
  lines = [
    f"# Sequence parallelism: 8 simulated CPU devices, batch {BATCH}, {HEADS} heads "
    f"({KV_HEADS} kv heads for softmax), head_dim {HEAD_DIM}, {jnp.dtype(DTYPE).name}",
    "",
    "Bytes sent per device per layer (MiB), read from compiled HLO; theoretical minimum in "
    "brackets. Peak memory per device of the training step vs the same step on one device.",
    "",
    "| strategy | T | forward MiB [min] | backward MiB [min] | peak MiB / device | "
    "peak MiB 1 device |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['strategy']} | {r['seq_len']} | {_mib(r['forward_bytes_per_device'])} "
      f"[{_mib(r['theoretical_forward_bytes'])}] | {_mib(r['backward_bytes_per_device'])} "
      f"[{_mib(r['theoretical_backward_bytes'])}] | {_mib(r['peak_memory_per_device'])} | "
      f"{_mib(r['peak_memory_single_device'])} |"
    )
  if model_rows:
    lines += model_markdown(model_rows)
  if timings:
    lines += [
      "",
      f"Wall time of one training step at T = {timing_len} (SIMULATED devices: 8 virtual "
      "devices share the host's cores, so this shows overhead, not speed-up).",
      "",
      "| strategy | 8 simulated devices (s) | one device (s) |",
      "|---|---|---|",
    ]
    for name, t in timings.items():
      lines.append(f"| {name} | {t['simulated_8_devices_s']:.3f} | {t['one_device_s']:.3f} |")
  return "\n".join(lines) + "\n"


def _merged(rows, model_rows, timings, timing_len):
  """These results with the last run's rows of every other strategy, in its order."""
  last = json.loads((RESULTS / "seqpar.json").read_text())
  if last["timing_len"] != timing_len:
    raise ValueError(f"--update needs --timing-len={last['timing_len']} as in the last results")

  def merge(old, new):
    replaced = {r["strategy"] for r in new}
    return [r for r in old if r["strategy"] not in replaced] + new

  return (
    merge(last["rows"], rows),
    merge(last["model_rows"], model_rows),
    {**last["wall_time"], **timings},
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="T = 16k only")
  parser.add_argument("--timing-len", type=int, default=4096)
  parser.add_argument("--strategies", default=",".join(SOFTMAX + STATE))
  parser.add_argument("--model-strategies", default=",".join(MODEL_STRATEGIES))
  parser.add_argument(
    "--update", action="store_true", help="keep the other strategies' rows of the last results"
  )
  args = parser.parse_args()
  lengths = [16_384] if args.quick else [16_384, 65_536, 262_144]
  mesh = jax.make_mesh((PARTS,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  rows, timings = [], {}
  for strategy in args.strategies.split(","):
    for seq_len in lengths:
      start = time.perf_counter()
      rows.append(measure(strategy, seq_len, mesh))
      print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f}s)", flush=True)
    if args.timing_len:
      timings[strategy] = wall_time(strategy, args.timing_len, mesh)
      print(strategy, timings[strategy], flush=True)
  model_rows = []
  for strategy in filter(None, args.model_strategies.split(",")):
    start = time.perf_counter()
    model_rows.append(measure_model(strategy, lengths[-1], mesh))
    print(json.dumps(model_rows[-1]), f"({time.perf_counter() - start:.0f}s)", flush=True)
  RESULTS.mkdir(exist_ok=True)
  if args.update:
    rows, model_rows, timings = _merged(rows, model_rows, timings, args.timing_len)
  payload = {
    "device": "8 simulated CPU devices",
    "rows": rows,
    "model_rows": model_rows,
    "wall_time": timings,
    "timing_len": args.timing_len,
  }
  (RESULTS / "seqpar.json").write_text(json.dumps(payload, indent=1))
  table = markdown(rows, model_rows, timings, args.timing_len)
  (RESULTS / "seqpar.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
