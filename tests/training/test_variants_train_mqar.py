"""Every variant with a causal form learns MQAR for 50 steps through `train.run`: the MQAR
config's options for it (its causal form, sizes for short sequences), on a tiny model."""

import numpy as np
import pytest

import train
from attnjax.training.metrics import read_metrics
from configs import mqar
from tests.training.tiny import tiny_config

# Where the MQAR config's options do not fit a 2-head, width-32 model of 32 tokens.
TINY_OPTIONS = {
  "moh": {"num_shared_heads": 0, "top_k": 1},
  "diffqkv": {"num_k_heads": 1, "q_aug_dim": 24},
  "disentangled": {"num_buckets": 16, "max_distance": 32},
}


def _options(name: str) -> dict:
  options = dict(mqar.get_config(name).model.mixer_options.get(name, {}))
  return {**options, **TINY_OPTIONS.get(name, {})}


@pytest.mark.parametrize("name", mqar.causal_presets())
def test_variant_loss_decreases_over_50_steps(name, tmp_path):
  config = tiny_config(steps=50, learning_rate=1e-2, checkpoint_every=50)
  config.model.layer_pattern = name
  with config.unlocked():
    config.model.mixer_options = {name: _options(name)} if _options(name) else {}
  train.run(config, str(tmp_path))
  losses = {m["step"]: m["train/loss"] for m in read_metrics(tmp_path) if "train/loss" in m}
  assert sorted(losses) == list(range(1, 51))
  first, last = (
    np.mean([losses[s] for s in range(1, 6)]),
    np.mean([losses[s] for s in range(46, 51)]),
  )
  assert np.isfinite(last) and last < first - 0.3, (name, first, last)
  if name == "moh":  # its sown load-balance loss reaches the objective and the metrics
    aux = [m["train/aux_loss"] for m in read_metrics(tmp_path) if "train/aux_loss" in m]
    assert len(aux) == 50 and all(a > 0 for a in aux)
