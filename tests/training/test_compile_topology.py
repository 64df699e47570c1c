"""The MQAR train step compiled for a v5e:2x2 topology on compile-only devices (no TPU here)."""

import json
import os
import subprocess
import sys

import pytest

from attnjax import aot

if not aot.libtpu_installed():
  pytest.skip(
    "needs libtpu's compile-only TPU devices: pip install -r requirements-compile.txt",
    allow_module_level=True,
  )

from attnjax.training import compile_topology
from tests.training.tiny import TINY_FLAGS, tiny_config

pytestmark = pytest.mark.tpu_compile

TOPOLOGY = "v5e:2x2"  # 4 chips
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _xla_attention(config):
  """`config` with its softmax layers on XLA attention rather than the Mosaic kernel.

  TODO: drop once Mosaic kernels compile inside GSPMD-partitioned programs; `impl="auto"`
  lowers `tpu_custom_call` on global arrays there, which XLA cannot partition
  (`test_softmax_kernels_compile_on_a_data_parallel_mesh`).
  """
  config.model.mixer_options = {"softmax": {"impl": "xla"}}
  return config


def _seq_parallel_config():
  """The tiny MQAR model with its sequence split over seq=4 (ring attention)."""
  config = tiny_config()
  config.mesh.shape.update(dict(data=1, fsdp=1, tensor=1, seq=4))
  config.parallel.softmax = "ring"
  return config


def _assert_consistent(report: dict) -> None:
  sizes = report["per_chip_bytes"]
  assert report["topology"] == TOPOLOGY
  assert report["chips"] == 4
  assert sizes["total"] >= sizes["arguments"] > 0
  assert sizes["temporaries"] >= 0
  assert report["fits"] is True
  assert report["hbm_bytes"] > sizes["total"]
  assert report["flops_per_step"] > 0


def test_mqar_step_compiles_and_fits():
  config = _xla_attention(tiny_config())
  report = compile_topology.compile_train_step(config, TOPOLOGY).as_json()
  _assert_consistent(report)
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "seq": 1}
  # the donated state is written in place: its outputs alias the arguments
  assert 0 < report["per_chip_bytes"]["aliased"] <= report["per_chip_bytes"]["arguments"]


def test_fsdp_step_gathers_weights_and_reduce_scatters_gradients():
  config = _xla_attention(tiny_config())
  config.mesh.shape.update(dict(data=1, fsdp=4))
  collectives = compile_topology.compile_train_step(config, TOPOLOGY).collectives
  assert collectives.get("all-gather", 0) > 0
  assert collectives.get("reduce-scatter", 0) > 0


def test_seq_parallel_step_exchanges_sequence_shards():
  report = compile_topology.compile_train_step(_seq_parallel_config(), TOPOLOGY).as_json()
  _assert_consistent(report)
  assert report["mesh"]["seq"] == 4
  assert report["collectives"].get("collective-permute", 0) > 0  # the ring passes k/v blocks
  assert report["mosaic_kernels"] > 0  # each chunk pair under shard_map runs the kernel


def test_softmax_kernels_compile_on_a_data_parallel_mesh():
  # impl="auto" attention runs per batch shard under shard_map (`attnjax.parallel.per_shard`)
  report = compile_topology.compile_train_step(tiny_config(), TOPOLOGY).as_json()
  _assert_consistent(report)
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "seq": 1}
  assert report["mosaic_kernels"] > 0


def test_model_too_large_for_hbm_raises_naming_topology_and_sizes():
  config = _xla_attention(tiny_config())
  config.model.update(dict(embed_dim=4096, vocab_size=262144))  # 1B float32 weights per chip
  hbm = aot.chip_memory(aot.tpu_devices(TOPOLOGY)[0]).hbm
  with pytest.raises(compile_topology.DoesNotFitError, match=rf"'{TOPOLOGY}'.* bytes .*{hbm}"):
    compile_topology.compile_train_step(config, TOPOLOGY)


@pytest.mark.parametrize(
  "topology, shape",
  [("v9z:2x2", {}), (TOPOLOGY, {"data": 8})],
  ids=["unknown-topology", "mesh-needs-8-devices"],
)
def test_bad_topology_raises_naming_compile_topology(topology, shape):
  config = tiny_config()
  config.mesh.shape.update(shape)
  with pytest.raises(ValueError, match="compile_topology"):
    compile_topology.compile_train_step(config, topology)


def test_train_py_prints_the_report_as_its_last_line(tmp_path):
  workdir = tmp_path / "workdir"
  # gaussian has no Pallas kernel (see `_xla_attention`)
  command = [sys.executable, "train.py", "--config=configs/mqar.py:gaussian", *TINY_FLAGS]
  command += [f"--workdir={workdir}", f"--compile_topology={TOPOLOGY}"]
  # this process already holds libtpu's lock file
  env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  _assert_consistent(report)
  assert not workdir.exists()  # nothing trained, nothing written
