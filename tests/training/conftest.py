"""One tiny MQAR training run shared by the tests that only read its results."""

import pytest

import train
from tests.training.tiny import tiny_config


@pytest.fixture(scope="session")
def mqar_run(tmp_path_factory) -> str:
  """Workdir of a finished 30-step run of `tiny_config()` (checkpoints at 20, 25, 30)."""
  workdir = tmp_path_factory.mktemp("mqar_run")
  train.run(tiny_config(), str(workdir))
  return str(workdir)
