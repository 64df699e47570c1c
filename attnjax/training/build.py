"""What a config builds before the first step: the mesh, the model, its data and its sharded state.

`experiment(config)` makes the device mesh, builds the model abstractly (`jax.eval_shape`, no
device memory), derives the shardings of the train state from the parameters' logical axis
names and `config.mesh.rules`, and returns an `Experiment`: `init()` creates the sharded train
state, `data(split)` the data source, `batch(...)` places a global batch on the mesh. It is the
one place where the config's mesh and rules become shardings.

Model kinds and data kinds are tables selected by `config.model.kind` and `config.data.kind`.
To add a task (say image classification), add a `ModelKind` (how to build the module from the
config, and its loss on a batch) and a `DataKind` (a source whose `batch(step, ...)` returns
the process-local rows of global batch `step` as numpy arrays, and a config check) to these
tables; `train.py` and `eval.py` need no change.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from attnjax import data, nn
from attnjax.data import text
from attnjax.data.shapes import Shapes
from attnjax.nn.seq_parallel import SeqParallel
from attnjax.nn.softmax_variants import AUX_LOSS
from attnjax.nn.vision import VisionTransformer, classification_loss
from attnjax.training import optimizer, sharding


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """`build(config, rngs, mesh=None) -> nnx.Module`; `loss(module, batch) -> (loss, sums)`.

  `mesh` is the mesh the model will run on (None: unknown, as when only its shapes are
  needed); a model that splits its sequence over the mesh axis `seq` reads it.

  The sums hold `loss_sum`, `correct_sum` and `weight_sum` over the batch (eval adds them
  up over batches), and optionally `aux_loss`.
  """

  build: Callable[..., nnx.Module]
  loss: Callable[[nnx.Module, dict], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class DataKind:
  """`make(config, split, seq_len=None)` -> a source; `validate(config)` raises ValueError."""

  make: Callable[..., Any]
  validate: Callable[[ml_collections.ConfigDict], None]


def seq_parallel(config: ml_collections.ConfigDict, mesh) -> SeqParallel | None:
  """The mixers' parallel context on `mesh`: None on one device.

  With mesh axis `seq` split, the mixers run their ops sequence-parallel with the strategies of
  `config.parallel`; otherwise per shard of the batch (Pallas kernels compile only there). The
  batch stays split over the mesh axes that `mesh.rules` gives the logical axis `batch`.
  """
  if mesh is None or mesh.size == 1:
    return None
  batch = dict(config.mesh.rules).get("batch")
  batch_axes = None if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
  return SeqParallel(
    mesh,
    softmax=config.parallel.softmax,
    linear=config.parallel.linear,
    axis="seq",
    batch_axes=batch_axes,
  )


def build_lm(config: ml_collections.ConfigDict, rngs: nnx.Rngs, mesh=None) -> nn.DecoderLM:
  m = config.model
  return nn.DecoderLM(
    vocab_size=m.vocab_size,
    embed_dim=m.embed_dim,
    depth=m.depth,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads or None,
    head_dim=m.head_dim or None,
    mlp_dim=m.mlp_dim,
    layer_pattern=m.layer_pattern,
    mixer_options={name: dict(options) for name, options in m.mixer_options.items()},
    tie_embeddings=m.tie_embeddings,
    dtype=jnp.dtype(m.dtype),
    seq_parallel=seq_parallel(config, mesh),
    rngs=rngs,
  )


def lm_forward(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(logits `[batch, seq, vocab]`, sum of the sown auxiliary losses) of `batch["inputs"]`."""
  logits, intermediates = nnx.capture(model, nnx.Intermediate)(
    batch["inputs"], segment_ids=batch.get("segment_ids")
  )
  aux = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(intermediates))
    if any(getattr(key, "key", None) == AUX_LOSS for key in path)
  ]
  return logits, sum((jnp.sum(a) for a in aux), jnp.zeros((), jnp.float32))


def lm_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted next-token cross-entropy plus auxiliary losses, and metric sums.

  `batch`: `inputs`, `targets` int `[batch, seq]`, `weights` float `[batch, seq]`, optional
  `segment_ids`. Returns (mean cross-entropy over weighted positions + aux loss, sums
  `loss_sum`, `correct_sum`, `weight_sum` and the batch's `aux_loss`).
  """
  logits, aux_loss = lm_forward(model, batch)
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"]
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  sums = {
    "loss_sum": jnp.sum(token_loss * weights),
    "correct_sum": jnp.sum(correct * weights),
    "weight_sum": jnp.sum(weights),
    "aux_loss": aux_loss,
  }
  return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0) + aux_loss, sums


def _synthetic(name: str, cls):
  def make(config, split: str = "train", seq_len: int | None = None):
    options = dict(config.data[name])
    if seq_len is not None:
      options["seq_len"] = seq_len
    return cls(**options)

  def validate(config):
    try:
      task = make(config)
    except (TypeError, ValueError) as e:
      raise ValueError(f"data.{name}: {e}") from None
    if task.vocab_size > config.model.vocab_size:
      raise ValueError(
        f"model.vocab_size={config.model.vocab_size} is smaller than "
        f"data.{name}.vocab_size={task.vocab_size}"
      )

  return DataKind(make=make, validate=validate)


def _make_text(config, split: str = "train", seq_len: int | None = None):
  options = config.data.text
  data_dir = options.data_dir or os.path.expanduser("~/.cache/attnjax/tfds")
  if jax.process_index() == 0:  # one writer; the others wait for the finished dataset
    text.build(options.source_dir or text.DEFAULT_SOURCE_DIR, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("attnjax text dataset built")
  return text.PackedText(data_dir, split, seq_len=seq_len or options.seq_len)


def _validate_text(config):
  options = config.data.text
  if options.seq_len < 1:
    raise ValueError(f"data.text.seq_len must be positive, got {options.seq_len}")
  if options.source_dir and not os.path.isdir(options.source_dir):
    raise ValueError(f"data.text.source_dir {options.source_dir!r} is not a directory")
  if config.model.vocab_size < text.ByteTokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={config.model.vocab_size} is smaller than the byte tokenizer's "
      f"{text.ByteTokenizer.vocab_size}"
    )


def build_vit(config: ml_collections.ConfigDict, rngs, mesh=None) -> VisionTransformer:
  if mesh is not None and mesh.shape["seq"] > 1:
    raise ValueError(
      f"model.kind 'vit' has no sequence parallelism; set mesh.shape.seq=1, got "
      f"mesh {dict(mesh.shape)}"
    )
  m = config.model
  return VisionTransformer(
    image_size=config.data.shapes.image_size,
    patch_size=config.data.shapes.patch_size,
    num_classes=m.vit.num_classes,
    embed_dim=m.embed_dim,
    depth=m.depth,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads or None,
    head_dim=m.head_dim or None,
    mlp_dim=m.mlp_dim,
    layer_pattern=m.layer_pattern,
    mixer_options={name: dict(options) for name, options in m.mixer_options.items()},
    rngs=rngs,
  )


def make_shapes(config, split: str = "train", seq_len: int | None = None) -> Shapes:
  del split, seq_len  # examples are drawn per split by the source; image size is fixed
  return Shapes(**config.data.shapes)


def validate_shapes(config) -> None:
  try:
    source = make_shapes(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"data.shapes: {e}") from None
  if config.model.vit.num_classes != source.num_classes:
    raise ValueError(
      f"model.vit.num_classes={config.model.vit.num_classes} must be the shapes task's "
      f"{source.num_classes} classes"
    )


MODELS: dict[str, ModelKind] = {
  "lm": ModelKind(build=build_lm, loss=lm_loss),
  "vit": ModelKind(build=build_vit, loss=classification_loss),
}

DATASETS: dict[str, DataKind] = {
  "mqar": _synthetic("mqar", data.MQAR),
  "passkey": _synthetic("passkey", data.Passkey),
  "selective_copy": _synthetic("selective_copy", data.SelectiveCopy),
  "text": DataKind(make=_make_text, validate=_validate_text),
  "shapes": DataKind(make=make_shapes, validate=validate_shapes),
}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The model of `config` on `mesh`, abstract until `init()`, with its optimizer and data.

  The train state is a plain pytree `{"params", "opt_state", "step"}`; the model's structure
  (`graphdef`) stays here, and `model(params)` re-assembles the module with `nnx.merge`.
  """

  config: ml_collections.ConfigDict
  mesh: Any
  graphdef: Any
  abstract_state: Any  # ShapeDtypeStructs carrying the target shardings
  state_shardings: Any
  batch_sharding: Callable[[int], jax.sharding.NamedSharding]  # ndim -> a data array's sharding
  init: Callable[[], Any]  # () -> sharded train state
  tx: optax.GradientTransformation
  schedule: optax.Schedule

  @property
  def loss(self) -> Callable[[nnx.Module, dict], tuple[jax.Array, dict[str, jax.Array]]]:
    """The model kind's `loss(module, batch) -> (loss, sums)`."""
    return MODELS[self.config.model.kind].loss

  def model(self, params) -> nnx.Module:
    """The module with parameters `params` (a pure dict like `abstract_state["params"]`)."""
    return nnx.merge(self.graphdef, params)

  def data(self, split: str = "train", seq_len: int | None = None):
    """The source of `split` (sequences of `seq_len` tokens; None: the config's length)."""
    return DATASETS[self.config.data.kind].make(self.config, split, seq_len=seq_len)

  def batch(self, source, step: int, *, split: str, batch_size: int) -> dict[str, jax.Array]:
    """Global batch `step` of `split` from `source`, sharded over the batch axes of the mesh.

    This process loads only its own rows; each array is `[batch_size, seq, ...]` (its first
    two dims split by the logical axes `batch` and `seq` of `mesh.rules`).
    """
    local = source.batch(
      step,
      seed=self.config.seed,
      global_batch_size=batch_size,
      split=split,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    return {key: self._global(rows) for key, rows in local.items()}

  def _global(self, rows: np.ndarray) -> jax.Array:
    global_shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    return jax.make_array_from_process_local_data(
      self.batch_sharding(rows.ndim), rows, global_shape
    )


def experiment(config: ml_collections.ConfigDict, mesh=None) -> Experiment:
  """Builds `config`'s model abstractly (no memory) on `mesh` (None: `config.mesh.shape`).

  The parameters' shardings come from their logical axis names through `config.mesh.rules`
  (an indivisible dimension raises here); the optimizer state shards like its parameters.
  With `mesh.shape["seq"] > 1` the mixers split the sequence over that axis
  (`seq_parallel`), and a layer that cannot be split raises here.
  """
  mesh = sharding.make_mesh(config.mesh.shape) if mesh is None else mesh
  tx, schedule = optimizer.make_optimizer(config.train)
  model_kind = MODELS[config.model.kind]

  def init_params():
    return nnx.split(model_kind.build(config, nnx.Rngs(config.seed), mesh))

  graphdef, abstract_params = jax.eval_shape(init_params)
  logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  abstract_params = nnx.to_pure_dict(abstract_params)
  param_shardings = sharding.tree_shardings(logical_specs, config.mesh.rules, mesh)
  sharding.check_divisible(abstract_params, param_shardings)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_opt,
    param_shardings,
    transform_non_params=lambda _: replicated,
  )
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
  abstract = {
    "params": abstract_params,
    "opt_state": abstract_opt,
    "step": jnp.zeros((), jnp.int32),
  }
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
    abstract,
    state_shardings,
  )

  def init():
    params = nnx.to_pure_dict(init_params()[1])
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  return Experiment(
    config=config,
    mesh=mesh,
    graphdef=graphdef,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    batch_sharding=functools.partial(sharding.batch_sharding, mesh, config.mesh.rules),
    init=jax.jit(init, out_shardings=state_shardings),
    tx=tx,
    schedule=schedule,
  )
