"""Test set-up: 8 simulated CPU devices (set before jax is imported) and hypothesis profiles."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
hypothesis.settings.register_profile("dev", max_examples=6, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
