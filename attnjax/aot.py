"""Ahead-of-time compilation for TPUs this host does not have.

`libtpu` (install it with `pip install -r requirements-compile.txt`; it is not in
requirements.txt) provides compile-only TPU devices: `.compile()` on them runs the real XLA:TPU
and Mosaic compilers, with each chip's VMEM, SMEM and HBM limits, on a CPU host. Nothing here
imports libtpu until a topology is asked for, so CPU users never load it.

    devices = aot.tpu_devices("v5e:2x2")
    compiled = aot.compile_for(f, devices[:1], x, y)   # x, y: arrays or ShapeDtypeStructs
    aot.custom_calls(compiled)["tpu_custom_call"]      # Mosaic kernels in the program
    aot.collectives(compiled)                          # all-reduce, all-gather, ... counts
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Single chips need the host's 2x2 bounds; v4 and v5p chips are megacore (one device per chip).
GENERATIONS = {
  "v4": "v4:2x2x1",
  "v5e": "v5e:2x2",
  "v5p": "v5p:2x2x1",
  "v6e": "v6e:2x2",
  "tpu7x": "tpu7x:2x2x1",
}


def libtpu_installed() -> bool:
  """True when the TPU compiler (the `libtpu` package) is importable."""
  return importlib.util.find_spec("libtpu") is not None


@functools.cache
def tpu_devices(topology: str) -> tuple[jax.Device, ...]:
  """The compile-only devices of a TPU `topology` such as "v5e:2x2" or "v5p:4x4x8".

  Raises ValueError naming the topology when libtpu is missing or rejects the name.
  """
  if not libtpu_installed():
    raise ValueError(
      f"compiling for topology={topology!r} needs the TPU compiler: "
      "pip install -r requirements-compile.txt"
    )
  # libtpu takes a lock file per process unless told otherwise; compile-only clients in
  # several processes (pytest-xdist workers, parallel benchmarks) need no exclusive TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # libtpu reports bad names as XlaRuntimeError
    raise ValueError(f"libtpu rejects topology={topology!r}: {e}") from None
  return tuple(desc.devices)


@dataclasses.dataclass(frozen=True)
class ChipMemory:
  """Per-device capacities in bytes (a megacore device counts both TensorCores)."""

  device_kind: str
  hbm: int
  vmem: int
  smem: int


# device_kind -> Pallas' ChipVersion member name, for the generations in GENERATIONS.
_CHIP_VERSIONS = {
  "TPU v4": "TPU_V4",
  "TPU v5 lite": "TPU_V5E",
  "TPU v5": "TPU_V5P",
  "TPU v6 lite": "TPU_V6E",
  "TPU7x": "TPU_7X",
}


def chip_memory(device: jax.Device) -> ChipMemory:
  """HBM, VMEM and SMEM of one compile-only TPU device, from Pallas' TPU tables."""
  from jax.experimental.pallas import tpu as pltpu

  if device.device_kind not in _CHIP_VERSIONS:
    raise ValueError(f"no memory table for device_kind={device.device_kind!r}")
  cores = getattr(device, "num_cores", 1)
  chip = pltpu.ChipVersion[_CHIP_VERSIONS[device.device_kind]]
  info = pltpu.get_tpu_info_for_chip(chip, cores)
  return ChipMemory(
    device.device_kind,
    hbm=info.hbm_capacity_bytes * cores,
    vmem=info.vmem_capacity_bytes,
    smem=info.smem_capacity_bytes,
  )


def abstract(tree, sharding: jax.sharding.Sharding):
  """`tree` with every array replaced by a ShapeDtypeStruct placed by `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def compile_for(fn: Callable, devices: Sequence[jax.Device], *args, **jit_kwargs):
  """`jax.jit(fn)` compiled for `devices` with every argument replicated on them.

  `args` are arrays or ShapeDtypeStructs (only shapes and dtypes are read). Returns the
  `jax.stages.Compiled`; compiler errors (VMEM overflow, an op Mosaic cannot lower) raise.
  """
  mesh = Mesh(np.array(devices), ("devices",))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(fn, **jit_kwargs).lower(*abstract(args, replicated)).compile()


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(compiled) -> collections.Counter:
  """How many times each custom-call target appears in the compiled HLO."""
  return collections.Counter(_CUSTOM_CALL.findall(compiled.as_text()))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# In HLO text an op's name stands between its result type and `(`; an asynchronous pair
# (`-start`, `-done`) counts once.
_COLLECTIVE = re.compile(rf"\s({'|'.join(COLLECTIVES)})(?:-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) .*?^}$", re.MULTILINE | re.DOTALL)
# XLA:TPU writes a reduce-scatter as a fusion of this name: an all-reduce that each device
# slices its shard from.
_REDUCE_SCATTER_FUSION = "all-reduce-scatter"


def collectives(compiled) -> collections.Counter:
  """How many collective ops of each kind in `COLLECTIVES` the compiled HLO holds.

  Ops are counted where they stand in the program text: one inside a loop body counts once.
  """
  counts = collections.Counter()
  for computation in _COMPUTATION.finditer(compiled.as_text()):
    if computation[1].startswith(_REDUCE_SCATTER_FUSION):
      counts["reduce-scatter"] += 1
    else:
      counts.update(_COLLECTIVE.findall(computation[0]))
  return counts


VMEM_SPACE = "1"  # Mosaic's memory-space id of VMEM in `used_scoped_memory_configs`


def kernel_scoped_memory(compiled) -> list[dict[str, int]]:
  """Per Mosaic kernel in the compiled program: the scoped memory the compiler allocated,
  `{memory_space_id: bytes}` (id "1" is VMEM), from each custom call's backend config.

  XLA places a kernel's scoped region at an offset (`scoped_memory_configs`); the
  `used_scoped_memory_configs` entry gives the end of what the kernel used, so the kernel's
  bytes are that end minus the region's offset.
  """
  used = []
  for line in compiled.as_text().splitlines():
    if 'custom_call_target="tpu_custom_call"' not in line:
      continue
    start = line.index("backend_config=") + len("backend_config=")
    config, _ = json.JSONDecoder().raw_decode(line, start)
    region = {e["memory_space"]: int(e["offset"]) for e in config.get("scoped_memory_configs", [])}
    sizes: dict[str, int] = collections.Counter()
    for entry in config.get("used_scoped_memory_configs", []):
      space = entry["memory_space"]
      sizes[space] += int(entry["offset"]) + int(entry["size"]) - region.get(space, 0)
    used.append(dict(sizes))
  return used
