"""Two processes on localhost (gloo CPU collectives) train exactly like one process."""

import os
import socket
import subprocess
import sys

import pytest

from attnjax.training.metrics import read_metrics
from tests.training.tiny import TINY_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process: int, env_extra: dict) -> subprocess.Popen:
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    **env_extra,
  }
  return subprocess.Popen(
    [sys.executable, "train.py", "--config=configs/mqar.py:softmax", f"--workdir={workdir}",
     *TINY_FLAGS, "--config.train.steps=6", "--config.train.checkpoint_every=3"],
    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip


def _losses(workdir):
  return [m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
  single = _launch(tmp_path / "one", 2, {})
  port = _free_port()
  pair = [
    _launch(
      tmp_path / "two",
      1,
      {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i),
      },
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in (single, *pair)]
  for proc, out in zip((single, *pair), outputs, strict=True):
    assert proc.returncode == 0, out[-3000:]
  assert "'data': 2" in outputs[1]  # process 0 saw the 2-device global mesh
  assert len(_losses(tmp_path / "one")) == 6
  assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-6)
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]
