"""Training with the sequence split over the mesh axis `seq`: the losses of a hybrid model on a
data=2 x seq=4 mesh equal those on data=2 x fsdp=4 (seq=1), on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.seq_parallel import SeqParallel
from attnjax.training import build, sharding
from attnjax.training import config as config_lib
from attnjax.training.step import make_train_step
from tests.helpers import assert_close, random_normal
from tests.training.tiny import tiny_config

STEPS = 3


def _hybrid(seq: int, softmax: str = "ring", linear: str = "lasp2", pattern="softmax,gla"):
  """A 2-layer hybrid MQAR model (4 heads, sequences of 32) on data=2 x fsdp x seq = 8 CPUs."""
  config = tiny_config(steps=STEPS)
  config.model.depth = 2
  config.model.num_heads = 4
  config.model.layer_pattern = pattern
  config.mesh.shape.update(dict(data=2, fsdp=4 // seq, tensor=1, seq=seq))
  config.parallel.update(dict(softmax=softmax, linear=linear))
  config_lib.validate(config)
  return config


def _train_losses(config) -> list[float]:
  """Losses of `STEPS` train steps of `config` (the loop's own jitted step and batches)."""
  exp = build.experiment(config)
  model = exp.model(exp.abstract_state["params"])
  expected = build.seq_parallel(config, exp.mesh)
  if expected is not None:
    expected = expected.for_layers(model.layer_names)
  # Split exactly when seq > 1, in the model's layout.
  assert all(block.mixer.seq_parallel == expected for block in model.blocks)
  source = exp.data("train")
  step, state, losses = make_train_step(exp), exp.init(), []
  for i in range(STEPS):
    batch = exp.batch(source, i, split="train", batch_size=config.train.batch_size)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


@functools.cache
def _unsplit_losses() -> tuple[float, ...]:
  return tuple(_train_losses(_hybrid(seq=1)))


@pytest.mark.parametrize(
  "softmax, linear",
  [("ring", "lasp2"), ("allgather", "zeco"), ("ulysses", "lasp2h")],
  ids=["ring-lasp2", "allgather-zeco", "ulysses-lasp2h"],
)
def test_hybrid_losses_on_seq4_match_seq1(softmax, linear):
  split = _train_losses(_hybrid(seq=4, softmax=softmax, linear=linear))
  np.testing.assert_allclose(split, _unsplit_losses(), rtol=1e-4)


def test_all_ring_model_trains_in_the_zigzag_layout_as_on_seq1():
  """Tokens laid out once over data=2 x seq=4, batch split over data and fsdp."""
  split = _hybrid(seq=4, pattern="softmax")
  exp = build.experiment(split)
  assert exp.model(exp.abstract_state["params"]).seq_parallel.layout == "zigzag"
  unsplit = _train_losses(_hybrid(seq=1, pattern="softmax"))
  np.testing.assert_allclose(_train_losses(split), unsplit, rtol=1e-4)


def test_mixer_options_reach_the_split_ops_values_and_gradients():
  """`sliding_window` (window 5, its mask shifted per shard) and `based` (feature map, scale)."""
  config = _hybrid(seq=4, softmax="allgather", pattern="sliding_window,based")
  config.model.mixer_options = {"sliding_window": {"window": 5}}
  mesh = sharding.make_mesh(config.mesh.shape)
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, config.model.vocab_size)
  weights = random_normal(jax.random.key(1), (4, 32, config.model.vocab_size))

  @nnx.jit
  def logits_and_grads(model):
    def loss(model):
      logits = model(tokens)
      return jnp.sum(logits * weights), logits

    return nnx.grad(loss, has_aux=True)(model)

  grads, logits = logits_and_grads(build.MODELS["lm"].build(config, nnx.Rngs(0), mesh))
  ref_grads, ref_logits = logits_and_grads(build.MODELS["lm"].build(config, nnx.Rngs(0)))
  assert_close(logits, ref_logits, 1e-5, "logits")
  ref_leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(ref_grads))
  leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
  for (path, ref_grad), grad in zip(ref_leaves, leaves, strict=True):
    assert_close(grad, ref_grad, 2e-5, jax.tree_util.keystr(path))


def test_parameter_tree_does_not_depend_on_the_seq_axis():
  """Checkpoints interchange: the same parameters, shapes and dtypes with seq=4 or seq=1."""
  split, unsplit = (build.experiment(_hybrid(seq=seq)).abstract_state["params"] for seq in (4, 1))
  assert jax.tree.structure(split) == jax.tree.structure(unsplit)
  for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(unsplit), strict=True):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("softmax", "lasp2", r"parallel.softmax must be one of \['allgather', 'lasp2h', 'ring'"),
    ("linear", "ring", r"parallel.linear must be one of \['lasp2', 'lasp2h', 'zeco'\]"),
  ],
)
def test_unknown_strategy_is_a_config_error_naming_the_key(key, value, match):
  config = tiny_config()
  config.parallel[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


@pytest.mark.parametrize(
  "pattern, softmax, mixer_options, match",
  [
    ("softplus,gla", "ring", {}, "'softplus' .* strategy 'ring': its op returns no log-sum-exp"),
    ("cca,gla", "ulysses", {}, "'cca' .* strategy 'ulysses': its op returns no log-sum-exp"),
    ("softmax,flowformer", "ring", {}, "'flowformer' .* strategy 'lasp2': .*got 'flowformer'"),
    ("softmax,linear", "ring", {"linear": {"causal": False}}, "'linear' .* 'lasp2': .*bidirect"),
    ("gated,gla", "ulysses", {}, "'gated' .* strategy 'ulysses': its op returns no log-sum"),
  ],
  ids=["no-lse-ring", "no-lse-ulysses", "own-decay", "bidirectional", "extra-op-arguments"],
)
def test_layer_that_cannot_be_split_fails_at_setup_naming_variant_and_strategy(
  pattern, softmax, mixer_options, match
):
  config = _hybrid(seq=4, softmax=softmax, pattern=pattern)
  config.model.mixer_options = mixer_options
  with pytest.raises(ValueError, match=match):
    build.experiment(config)
  config.mesh.shape.update(dict(fsdp=4, seq=1))
  build.experiment(config)  # the same layers build unsplit


def test_model_without_seq_axis_runs_its_ops_per_batch_shard():
  mesh = sharding.make_mesh(_hybrid(seq=1).mesh.shape)
  context = build.seq_parallel(_hybrid(seq=1), mesh)
  assert not context.splits_sequence and context.batch_axes == ("data", "fsdp")
  one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "seq": 1}, jax.devices()[:1])
  assert build.seq_parallel(_hybrid(seq=1), one_device) is None
  split = _hybrid(seq=4)
  context = build.seq_parallel(split, sharding.make_mesh(split.mesh.shape))
  assert context == SeqParallel(
    context.mesh, softmax="ring", linear="lasp2", axis="seq", batch_axes=("data", "fsdp")
  )
