"""The train step of a config compiled ahead of time for a TPU topology this host does not have.

    report = compile_topology.compile_train_step(config, "v5e:16x16")
    report.as_json()  # per-chip bytes vs HBM, FLOPs per step, collectives, Mosaic kernels

The mesh is `config.mesh.shape` over the topology's compile-only devices (`attnjax.aot`), the
model and optimizer are built abstractly (`build.experiment`, no memory), and the compiled
program is the loop's own jitted step (`step.make_train_step`: donated state, the state's and
the batch's shardings) on a global batch of `train.batch_size` rows shaped like the config's
data source. Figures are the compiler's (`memory_analysis`, `cost_analysis`, the HLO text),
not measurements of a run. Nothing is trained and no checkpoint or log is written (a text
config's dataset is prepared if missing: one row of it gives the batch's shapes).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections

from attnjax import aot
from attnjax.training import build, sharding
from attnjax.training import config as config_lib
from attnjax.training.step import make_train_step


class DoesNotFitError(ValueError):
  """The compiled train step needs more memory per chip than the topology's HBM."""


@dataclasses.dataclass(frozen=True)
class TopologyReport:
  """The compiler's figures for one train step on `topology`, per chip (= per device).

  Per-chip bytes: `arguments` (parameters, optimizer state and the batch shard), `outputs`
  (the new state and the metrics), `aliased` (output bytes written into donated argument
  buffers) and `temporaries` (activations and other scratch). The donated state's outputs
  reuse its argument buffers, so the live total is
  `arguments + outputs - aliased + temporaries` (the program's code is left out).
  `flops_per_chip` is what one chip executes (`cost_analysis` of the partitioned program;
  work inside Mosaic kernels counts only through their cost estimates); `flops_per_step` is
  that times `chips`, replicated work included. `collectives` counts the collective ops of
  each kind in the compiled program text (an op inside a loop counts once). `compile_s` is
  the wall time of lowering and compiling.
  """

  topology: str
  chips: int
  device_kind: str
  mesh: dict[str, int]
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  hbm_bytes: int
  flops_per_chip: float
  collectives: dict[str, int]
  mosaic_kernels: int
  compile_s: float

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm_bytes

  @property
  def flops_per_step(self) -> float:
    return self.flops_per_chip * self.chips

  def as_json(self) -> dict:
    """The report as one JSON-ready dict (the last line `train.py --compile_topology` prints)."""
    return {
      "topology": self.topology,
      "chips": self.chips,
      "device_kind": self.device_kind,
      "mesh": self.mesh,
      "per_chip_bytes": {
        "arguments": self.arguments,
        "outputs": self.outputs,
        "aliased": self.aliased,
        "temporaries": self.temporaries,
        "total": self.total,
      },
      "hbm_bytes": self.hbm_bytes,
      "fits": self.fits,
      "flops_per_step": self.flops_per_step,
      "flops_per_chip": self.flops_per_chip,
      "collectives": self.collectives,
      "mosaic_kernels": self.mosaic_kernels,
      "compile_s": round(self.compile_s, 1),
    }

  def summary(self) -> str:
    """A few human-readable lines of the report."""
    collectives = ", ".join(f"{n} {kind}" for kind, n in self.collectives.items()) or "none"
    return "\n".join(
      [
        f"{self.topology}: {self.chips} x {self.device_kind}, mesh {self.mesh}, "
        f"lowered and compiled in {self.compile_s:.1f}s",
        f"per chip: arguments {_size(self.arguments)} (parameters, optimizer state, batch), "
        f"temporaries {_size(self.temporaries)}, outputs {_size(self.outputs)} "
        f"({_size(self.aliased)} in donated buffers), total {_size(self.total)} of "
        f"{_size(self.hbm_bytes)} HBM: {'fits' if self.fits else 'does NOT fit'}",
        f"FLOPs per step {self.flops_per_step:.3e} ({self.flops_per_chip:.3e} per chip)",
        f"collectives: {collectives}; Mosaic kernels: {self.mosaic_kernels}",
      ]
    )


def compile_train_step(config: ml_collections.ConfigDict, topology: str) -> TopologyReport:
  """Compiles `config`'s train step for the TPU `topology` (e.g. "v5e:16x16", "v5p:4x4x8").

  Raises ValueError naming `compile_topology` for a topology libtpu rejects (or libtpu
  missing) or one whose device count `config.mesh.shape` cannot fill, and `DoesNotFitError`
  naming the topology and the sizes when the step needs more than a chip's HBM.
  """
  config_lib.validate(config)
  devices = _topology_devices(topology)
  try:
    mesh = sharding.make_mesh(config.mesh.shape, devices)
  except ValueError as e:
    raise ValueError(f"compile_topology={topology!r} has {len(devices)} devices: {e}") from None
  exp = build.experiment(config, mesh)
  hbm = aot.chip_memory(devices[0]).hbm
  batch = abstract_batch(exp, config.train.batch_size)
  start = time.perf_counter()
  lowered = make_train_step(exp).lower(exp.abstract_state, batch)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    state_bytes = sharding.bytes_per_device(exp.abstract_state)
    raise DoesNotFitError(
      f"the train step does not fit on compile_topology={topology!r} (mesh {dict(mesh.shape)}): "
      f"parameters and optimizer state alone take {state_bytes} bytes per chip of {hbm} HBM "
      f"bytes; the compiler says: {str(e).splitlines()[0]}"
    ) from None
  report = _report(topology, mesh, compiled, hbm, time.perf_counter() - start)
  if not report.fits:
    raise DoesNotFitError(
      f"the train step does not fit on compile_topology={topology!r} (mesh {report.mesh}): "
      f"{report.total} bytes per chip (arguments {report.arguments}, temporaries "
      f"{report.temporaries}) exceed the chip's {hbm} HBM bytes"
    )
  return report


def abstract_batch(exp: build.Experiment, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A global train batch of `batch_size` rows `[batch_size, seq, ...]` as ShapeDtypeStructs.

  Keys, dtypes and row shapes are those of one row of the experiment's train source; the
  shardings are the ones `Experiment.batch` places real batches with.
  """
  row = exp.data("train").batch(0, seed=exp.config.seed, global_batch_size=1, split="train")
  return {
    key: jax.ShapeDtypeStruct(
      (batch_size, *value.shape[1:]), value.dtype, sharding=exp.batch_sharding(value.ndim)
    )
    for key, value in row.items()
  }


def _topology_devices(topology: str) -> tuple[jax.Device, ...]:
  try:
    return aot.tpu_devices(topology)
  except ValueError as e:
    raise ValueError(f"compile_topology: {e}") from None


def _report(topology: str, mesh, compiled, hbm: int, compile_s: float) -> TopologyReport:
  memory = compiled.memory_analysis()
  return TopologyReport(
    topology=topology,
    chips=mesh.size,
    device_kind=mesh.devices.flat[0].device_kind,
    mesh=dict(mesh.shape),
    arguments=memory.argument_size_in_bytes,
    outputs=memory.output_size_in_bytes,
    aliased=memory.alias_size_in_bytes,
    temporaries=memory.temp_size_in_bytes,
    hbm_bytes=hbm,
    flops_per_chip=float(compiled.cost_analysis()["flops"]),
    collectives=dict(aot.collectives(compiled)),
    mosaic_kernels=aot.custom_calls(compiled)["tpu_custom_call"],
    compile_s=compile_s,
  )


def _size(n: int) -> str:
  """`n` bytes in the largest binary unit that leaves at least 1 (e.g. "1.50 GiB")."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"
