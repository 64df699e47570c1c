"""Test set-up: 8 simulated CPU devices (set before jax is imported) and hypothesis profiles."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
hypothesis.settings.register_profile("dev", max_examples=6, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _hardware_kernels_only_in_compile_tests(request, monkeypatch):
  """Outside tests marked `tpu_compile` (`gpu_compile`), no TPU (GPU) kernel is traced, as in a
  process that never made compile-only devices. The compilers stay loaded in an xdist worker
  once one of their tests has made them; without this, every later test there would also trace
  those kernels."""
  from kernels_pallas import common

  if request.node.get_closest_marker("tpu_compile") is None:
    monkeypatch.setattr(common, "_tpu_compiler_initialized", lambda: False)
  if request.node.get_closest_marker("gpu_compile") is None:
    monkeypatch.setattr(common, "_gpu_compiler_initialized", lambda: False)
