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
def _tpu_kernels_only_in_tpu_compile_tests(request, monkeypatch):
  """Outside tests marked `tpu_compile`, no TPU kernel is traced, as in a process that never made
  compile-only TPU devices. libtpu stays loaded in an xdist worker once one of its tests has
  made them; without this, every later test there would also trace the TPU kernels."""
  if request.node.get_closest_marker("tpu_compile") is None:
    from kernels_pallas import common

    monkeypatch.setattr(common, "_tpu_compiler_initialized", lambda: False)
