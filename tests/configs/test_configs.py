"""Config files: every preset validates and builds; the pod config shards on 256 devices."""

import importlib
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attnjax import registry
from attnjax.training import build, sharding
from attnjax.training import config as config_lib
from configs import mqar, pod_lm_1b, text_lm


@pytest.mark.parametrize("name", mqar.causal_presets())
@pytest.mark.parametrize("hybrid", [False, True], ids=["alone", "hybrid"])
def test_every_variant_alone_and_in_a_hybrid_is_a_buildable_mqar_preset(name, hybrid):
  config = mqar.get_config(mqar.HYBRID_PREFIX + name if hybrid else name)
  config_lib.validate(config)
  model = nnx.eval_shape(lambda: build.MODELS["lm"].build(config, nnx.Rngs(0)))
  assert model.layer_names == ((name, "softmax") if hybrid else (name, name))
  tokens = jax.ShapeDtypeStruct((2, config.data.mqar.seq_len), jnp.int32)
  # Traces init and the forward pass without compiling or allocating.
  logits = jax.eval_shape(lambda t: build.MODELS["lm"].build(config, nnx.Rngs(0))(t), tokens)
  assert logits.shape == (2, config.data.mqar.seq_len, config.model.vocab_size)


@pytest.mark.parametrize("name", sorted(set(registry.names()) - set(mqar.causal_presets())))
def test_bidirectional_variants_are_not_mqar_presets(name):
  with pytest.raises(ValueError, match="bidirectional"):
    mqar.get_config(name)


def test_unknown_preset_and_unknown_keys_are_rejected():
  with pytest.raises(ValueError, match="unknown preset 'softmx'"):
    mqar.get_config("softmx")
  config = mqar.get_config("softmax")
  with pytest.raises(AttributeError, match="depht"):
    config.model.depht = 3
  with pytest.raises(TypeError):
    config.train.steps = "many"


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("model.kind", "cnn", "model.kind must be one of"),
    ("train.learning_rate", -1.0, "train.learning_rate must be positive"),
    ("eval.evaluators", ("loss", "bleu"), "unknown evaluator 'bleu'"),
    ("model.vocab_size", 100, "model.vocab_size=100 is smaller than data.mqar.vocab_size=256"),
  ],
)
def test_invalid_values_name_their_key(key, value, match):
  config = mqar.get_config("softmax")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


@pytest.mark.parametrize("name", ["mqar", "text_lm", "pod_lm_1b"])
def test_config_docstrings_state_command_hardware_time_and_result(name):
  doc = importlib.import_module(f"configs.{name}").__doc__
  assert "python train.py --config=configs/" in doc
  for word in ("Hardware", "time", "xpected result"):
    assert word in doc, f"configs/{name}.py docstring lacks {word!r}"


def test_text_config_validates_and_builds():
  config = text_lm.get_config()
  config_lib.validate(config)
  model = nnx.eval_shape(lambda: build.MODELS["lm"].build(config, nnx.Rngs(0)))
  assert len(model.blocks) == config.model.depth


def test_pod_config_shards_every_parameter_on_a_simulated_256_chip_mesh():
  config = pod_lm_1b.get_config()
  config_lib.validate(config)
  mesh = sharding.abstract_mesh(config.mesh.shape)
  assert math.prod(mesh.shape.values()) == 256
  exp = build.experiment(config, mesh)
  params = exp.abstract_state["params"]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  num_params = sum(math.prod(x.shape) for _, x in leaves)
  assert 1.0e9 < num_params < 1.15e9
  rules = dict(config.mesh.rules)
  for path, x in leaves:
    spec = x.sharding.spec
    name = jax.tree_util.keystr(path)
    assert "fsdp" in spec, f"{name} {spec} is not sharded by fsdp"
    if x.ndim >= 2:
      assert "tensor" in spec, f"{name} {spec} is not sharded by tensor"
    for dim, axes in zip(x.shape, spec, strict=False):
      assert axes in (None, *rules.values()), name
      parts = 1 if axes is None else mesh.shape[axes]
      assert dim % parts == 0, f"{name} dim {dim} does not split over {axes}"
  # Matrices are split 64 ways (fsdp x tensor), norm scales 16 ways; data x seq replicate.
  param_bytes = sharding.bytes_per_device(params)
  assert 4 * num_params / 64 <= param_bytes < 1.01 * 4 * num_params / 64
  state_bytes = sharding.bytes_per_device(exp.abstract_state)
  assert 2.9 * param_bytes < state_bytes < 3.1 * param_bytes  # AdamW keeps mu and nu
  assert state_bytes < 256 * 2**20
  batch = sharding.batch_sharding(mesh, config.mesh.rules, 2)
  assert batch.shard_shape((config.train.batch_size, config.data.text.seq_len)) == (8, 2048)


def test_pod_mesh_does_not_fit_this_machine():
  with pytest.raises(ValueError, match="needs 256 devices, but 8 are available"):
    sharding.make_mesh(pod_lm_1b.get_config().mesh.shape)
