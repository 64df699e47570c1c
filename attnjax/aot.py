"""Ahead-of-time compilation for TPUs and GPUs this host does not have.

`pip install -r requirements-compile.txt` (not in requirements.txt) installs the compilers:
`libtpu` provides compile-only TPU devices, and the CUDA PJRT plugin with NVIDIA's `ptxas`
compile-only GPU devices described by a `GpuTargetConfigProto` (`attnjax/gpu_targets/`).
`.compile()` on them runs the real XLA:TPU + Mosaic, or XLA:GPU + Triton + ptxas, with each
chip's VMEM/SMEM or shared-memory and register limits, on a CPU host. Nothing here loads either
plugin until a device is asked for, so CPU users never see them.

    devices = aot.tpu_devices("v5e:2x2")
    compiled = aot.compile_for(f, devices[:1], x, y)   # x, y: arrays or ShapeDtypeStructs
    aot.custom_calls(compiled)["tpu_custom_call"]      # Mosaic kernels in the program
    aot.collectives(compiled)                          # all-reduce, all-gather, ... counts

    gpu = aot.gpu_devices("h200")
    compiled, kernels = aot.compile_for_gpu(f, gpu[0], x, y)  # kernels: shared memory, registers
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kernels_pallas import common as kernel_common

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


# ---------------------------------------------------------------------------------------------
# GPUs: compile-only CUDA devices from a target description.

GPU_TARGETS = {"h200": "h200.txtpb", "a100": "a100.txtpb"}  # files in attnjax/gpu_targets/
_GPU_TARGET_DIR = os.path.join(os.path.dirname(__file__), "gpu_targets")


def cuda_plugin_installed() -> bool:
  """True when JAX's CUDA PJRT plugin (`jax[cuda12-local]`) is importable."""
  return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


@functools.cache
def gpu_devices(target: str) -> tuple[jax.Device, ...]:
  """The compile-only device of GPU `target` (a key of `GPU_TARGETS`: "h200" is sm_90a,
  "a100" sm_80), made by the CUDA plugin from the target's `GpuTargetConfigProto`.

  Raises ValueError naming the target when it is unknown or the plugin is missing.
  """
  if target not in GPU_TARGETS:
    raise ValueError(f"target must be one of {sorted(GPU_TARGETS)}, got target={target!r}")
  if not cuda_plugin_installed():
    raise ValueError(
      f"compiling for target={target!r} needs the CUDA plugin: "
      "pip install -r requirements-compile.txt"
    )
  from jax.experimental import topologies

  with open(os.path.join(_GPU_TARGET_DIR, GPU_TARGETS[target])) as f:
    config = f.read()
  desc = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
  kernel_common.compile_only_gpu_devices_made()
  return tuple(desc.devices)


@dataclasses.dataclass(frozen=True)
class GpuKernel:
  """One Pallas kernel of a program compiled for a GPU, as its compilers report it."""

  name: str
  grid: tuple[int, ...]
  threads: int  # per block
  shared_memory: int  # bytes per block at launch (XLA's thunk sequence)
  registers: int  # per thread (ptxas -v)
  spill_bytes: int  # stores spilled to local memory (ptxas -v)
  tf32: bool  # the PTX holds a TF32 matrix multiply (f32 operands rounded to 10 mantissa bits)


def compile_for_gpu(fn: Callable, device: jax.Device, *args) -> tuple[object, list[GpuKernel]]:
  """`jax.jit(fn)` compiled for one compile-only GPU `device`, and its Pallas kernels.

  The program is compiled with XLA's dump on (a temporary directory): the thunk sequence gives
  each kernel's launch (grid, threads, shared memory) and the kernel's PTX, run through the
  same `ptxas` with `-v`, its registers and spills. Compiler errors (shared memory over the
  limit, a Triton lowering failure) raise.
  """
  names = pallas_call_names(fn, *args)
  with tempfile.TemporaryDirectory() as dump:
    lowered = jax.jit(fn).lower(*abstract(args, jax.sharding.SingleDeviceSharding(device)))
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
    kernels = _gpu_kernels(dump, names)
  return compiled, kernels


def pallas_call_names(fn: Callable, *args) -> set[str]:
  """The names of the `pallas_call`s that tracing `fn(*args)` makes (every branch)."""
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.add(str(eqn.params["name"]))
      for sub in subjaxprs(eqn):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def subjaxprs(eqn):
  """The jaxprs an equation holds (cond branches, custom_vjp bodies, pjit), one level down."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "jaxpr") and hasattr(item, "consts"):
        yield item.jaxpr
      elif hasattr(item, "eqns"):
        yield item


_THUNK = re.compile(
  r"(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes"
)
_PTX_ENTRY = re.compile(r"\.entry (\w+)\(")
_PTX_TARGET = re.compile(r"^\.target (\w+)", re.MULTILINE)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")
_TF32_MMA = re.compile(r"mma[\w.]*\.tf32")


def _gpu_kernels(dump: str, names: set[str]) -> list[GpuKernel]:
  launches = {}
  for path in sorted(_files(dump, "thunk_sequence.txt")):
    with open(path) as f:
      for m in _THUNK.finditer(f.read()):
        if m[1] in names:
          grid = tuple(int(x) for x in m[2].split(","))
          threads = int(np.prod([int(x) for x in m[3].split(",")]))
          launches[m[1]] = (grid, threads, int(m[4]))
  kernels = []
  for path in sorted(_files(dump, ".ptx")):
    with open(path) as f:
      ptx = f.read()
    entry = _PTX_ENTRY.search(ptx)
    if entry is None or entry[1] not in launches:
      continue
    registers, spills = _ptxas_usage(path, _PTX_TARGET.search(ptx)[1])
    grid, threads, shared = launches[entry[1]]
    tf32 = bool(_TF32_MMA.search(ptx))
    kernels.append(GpuKernel(entry[1], grid, threads, shared, registers, spills, tf32))
  return kernels


def _files(directory: str, suffix: str) -> list[str]:
  return [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(suffix)]


def ptxas_path() -> str:
  """The `ptxas` of the `nvidia-cuda-nvcc-cu12` wheel (the one XLA uses), else one on PATH."""
  spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "bin", "ptxas")
    if os.path.exists(path):
      return path
  path = shutil.which("ptxas")
  if path is None:
    raise ValueError("no ptxas: pip install -r requirements-compile.txt")
  return path


def _ptxas_usage(ptx_path: str, arch: str) -> tuple[int, int]:
  """(registers per thread, spill-store bytes) that `ptxas -v` reports for one kernel."""
  report = subprocess.run(
    [ptxas_path(), f"-arch={arch}", "-v", ptx_path, "-o", os.devnull],
    capture_output=True,
    text=True,
    check=True,
  ).stderr
  spills = _PTXAS_SPILLS.search(report)
  return int(_PTXAS_REGISTERS.search(report)[1]), int(spills[1]) if spills else 0
