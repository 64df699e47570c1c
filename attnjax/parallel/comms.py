"""Communication read from compiled HLO: every collective, its size, and bytes sent per device.

`collectives(compiled.as_text(), num_devices)` lists the collectives of an SPMD program with
how often each runs (loop bodies multiplied by their known trip counts, nested loops
compounded) and the bytes each device sends per run, by the usual algorithms:
ring all-gather / all-to-all send (g - 1) / g of the gathered result, a reduce-scatter
(g - 1) times its per-device result, an all-reduce twice (g - 1) / g of its operand; a
collective permute sends its buffer from each source to a different target.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_CALLEES = re.compile(
  r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program.

  Attributes:
    kind: "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute".
    shape: its result shape as HLO writes it, e.g. "f32[1,2,8,8]".
    nbytes: bytes of that result (per device).
    runs: how many times it executes (product of enclosing loops' trip counts).
    sent: bytes each device sends per run, `[num_devices]`.
  """

  kind: str
  shape: str
  nbytes: int
  runs: int
  sent: tuple[float, ...]

  @property
  def sent_total(self) -> np.ndarray:
    return np.asarray(self.sent) * self.runs


def _array_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _group_size(attributes: str, num_devices: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if listed and listed.group(1):
    return len(listed.group(1).split(","))
  return num_devices


def _sent_per_device(kind: str, nbytes: int, attributes: str, num_devices: int) -> np.ndarray:
  if kind == "collective-permute":
    sent = np.zeros(num_devices)
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    for source, target in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}" if pairs else ""):
      if source != target:
        sent[int(source)] += nbytes
    return sent
  g = _group_size(attributes, num_devices)
  factor = {
    "all-gather": (g - 1) / g,
    "all-to-all": (g - 1) / g,
    "reduce-scatter": g - 1,
    "all-reduce": 2 * (g - 1) / g,
  }[kind]
  return np.full(num_devices, nbytes * factor)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  bodies: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      bodies[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _run_counts(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
  """Times each computation runs per call of the entry computation."""
  counts: dict[str, int] = {}

  def visit(name: str, runs: int):
    counts[name] = counts.get(name, 0) + runs
    for line in bodies.get(name, ()):
      callees = _CALLEES.findall(line)
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:
        callees += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      factor = int(trips.group(1)) if trips and " while(" in line else 1
      for callee in callees:
        visit(callee, runs * factor)

  visit(entry, 1)
  return counts


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """The collectives of a compiled SPMD HLO module, with run counts and bytes per device."""
  bodies, entry = _computations(hlo_text)
  runs = _run_counts(bodies, entry)
  found = []
  for name, lines in bodies.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, op, rest = match.groups()
      kind = op.removesuffix("-start")
      if kind not in _KINDS or runs.get(name, 0) == 0:
        continue
      nbytes = _array_bytes(shape)
      sent = _sent_per_device(kind, nbytes, rest, num_devices)
      found.append(Collective(kind, shape, nbytes, runs[name], tuple(float(x) for x in sent)))
  return found


def bytes_sent_per_device(found: list[Collective], num_devices: int) -> float:
  """Largest total over devices of the bytes a device sends in one run of the program."""
  total = np.zeros(num_devices)
  for c in found:
    total += c.sent_total
  return float(total.max(initial=0.0))


def summary(found: list[Collective]) -> str:
  """JSON list of {kind, shape, runs} (for comparing programs, e.g. at two lengths)."""
  return json.dumps(
    sorted(({"kind": c.kind, "shape": c.shape, "runs": c.runs} for c in found), key=json.dumps)
  )


def theoretical_bytes(
  strategy: str,
  *,
  num_devices: int,
  batch: int,
  seq_len: int,
  heads: int,
  kv_heads: int,
  head_dim: int,
  itemsize: int,
  transitions: bool = False,
) -> tuple[float, float]:
  """(forward, backward) bytes a device must send per attention layer by `strategy`'s algorithm.

  The yardstick for `bytes_sent_per_device` of a compiled program: q, k, v are
  `[batch, seq_len, heads | kv_heads, head_dim]` of `itemsize` bytes split over `num_devices`;
  linear states are float32 `[batch, heads, head_dim, head_dim]`. `transitions`: the delta
  rule's LASP-2 also gathers each device's float32 `[batch, heads, head_dim, head_dim]`
  transition (its ZeCO passes states only).

  - "ring": K/V shards travel P - 1 hops; backward adds their gradients' P - 1 hops.
  - "allgather": all-gather of K/V forward, reduce-scatter of dK/dV backward.
  - "ulysses": all-to-all of q, k, v and out (kv heads repeated when P does not divide them),
    the same backward.
  - "lasp2": all-gather of P states forward, reduce-scatter of their gradients backward.
  - "zeco": each device receives exactly its prefix state, and sends one gradient back.
  """
  p = num_devices
  shard = seq_len // p
  kv_shard = batch * shard * kv_heads * 2 * head_dim * itemsize
  state = batch * heads * head_dim * head_dim * 4
  summary = 2 * state if transitions else state
  if strategy == "ring":
    return (p - 1) * kv_shard, 2 * (p - 1) * kv_shard
  if strategy == "allgather":
    return (p - 1) * kv_shard, (p - 1) * kv_shard
  if strategy == "ulysses":
    sent_kv_heads = kv_heads if kv_heads % p == 0 else heads
    local = batch * shard * head_dim * itemsize * (2 * heads + 2 * sent_kv_heads)
    return local * (p - 1) / p, local * (p - 1) / p
  if strategy == "lasp2":
    return (p - 1) * summary, (p - 1) * summary
  if strategy == "zeco":
    return state, state
  raise ValueError(
    f"strategy must be one of ['allgather', 'lasp2', 'ring', 'ulysses', 'zeco'], got {strategy!r}"
  )
