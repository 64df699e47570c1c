"""benchmarks/gpu.py: without a GPU it exits with status 2 and says so; `--smoke` runs its
harness at tiny shapes here and writes one JSON per kernel family with a timing or an error
for every implementation."""

from __future__ import annotations

import json
import subprocess

import jax
import pytest

from benchmarks import gpu

pytestmark = pytest.mark.skipif(
  jax.default_backend() == "gpu", reason="on a GPU the script times for real"
)


def test_without_a_gpu_exits_2_naming_the_backend(capsys):
  assert gpu.main([]) == gpu.NO_GPU
  assert "no GPU (JAX backend is 'cpu')" in capsys.readouterr().err


def test_the_shell_script_says_there_is_no_gpu():
  result = subprocess.run(["bash", "benchmarks/gpu.sh"], capture_output=True, text=True)
  assert result.returncode == 2 and "nothing timed" in result.stderr


def test_smoke_run_records_every_implementation(tmp_path):
  assert gpu.main(["--smoke", "--repeats", "1", "--out", str(tmp_path)]) == 0
  for family in gpu.FAMILIES:
    records = json.loads((tmp_path / f"gpu_{family}.json").read_text())["records"]
    assert records, family
    for r in records:
      assert ("error" in r) != ("forward_ms" in r), r
      if r["impl"] in ("xla", "attnjax.xla"):  # runs on this CPU
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0, r
