"""Every softmax-family variant of issue 8 learns MQAR for 50 steps through `train.run`."""

import numpy as np
import pytest

import train
from attnjax.training.metrics import read_metrics
from tests.training.tiny import tiny_config

# Options that make each variant do its thing on a 2-head, width-32 model of 32 tokens.
VARIANTS = {
  "gated": {},
  "sinks": {"num_sink_tokens": 1},
  "aaren": {},
  "moh": {"num_shared_heads": 0, "top_k": 1},
  "softplus": {"train_len": 32},
  "diffqkv": {"num_k_heads": 1, "q_aug_dim": 24},
  "disentangled": {"causal": True, "num_buckets": 16, "max_distance": 32},
  "selective": {},
  "gaussian": {},
  "cca": {"group_size": 4, "window": 8},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_loss_decreases_over_50_steps(name, tmp_path):
  config = tiny_config(steps=50, learning_rate=1e-2, checkpoint_every=50)
  config.model.layer_pattern = name
  with config.unlocked():
    config.model.mixer_options = {name: VARIANTS[name]} if VARIANTS[name] else {}
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
