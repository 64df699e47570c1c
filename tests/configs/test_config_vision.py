"""configs/vision.py: every preset validates and builds; a few train.py steps run end to end."""

import pytest
from flax import nnx

import train
from attnjax.training import build
from attnjax.training import config as config_lib
from configs import vision


@pytest.mark.parametrize("preset", sorted(vision.PRESETS))
def test_every_preset_validates_and_builds(preset):
  config = vision.get_config(preset)
  config_lib.validate(config)
  model = nnx.eval_shape(lambda: build.MODELS["vit"].build(config, nnx.Rngs(0)))
  assert model.layer_names == (vision.PRESETS[preset][0],) * config.model.depth


def test_docstring_states_command_hardware_time_and_result():
  for word in ("python train.py --config=configs/vision.py", "Hardware", "time", "xpected result"):
    assert word in vision.__doc__


def test_bad_values_name_their_key():
  config = vision.get_config("halo")
  config.model.vit.num_classes = 10
  with pytest.raises(ValueError, match="model.vit.num_classes"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown preset"):
    vision.get_config("swin")


def test_train_runs_a_few_steps(tmp_path):
  config = vision.get_config("maxvit")
  config.model.update(dict(depth=1, embed_dim=16, num_heads=2, mlp_dim=16))
  config.train.update(dict(steps=3, batch_size=8, log_every=1, eval_every=3, checkpoint_every=3))
  config.eval.update(dict(batch_size=8, num_batches=1))
  summary = train.run(config, str(tmp_path))
  assert summary["step"] == 3 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
