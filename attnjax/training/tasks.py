"""What to train: tables of model kinds and data kinds, selected by `config.model.kind` and
`config.data.kind`.

To add a task (say image classification), add a `ModelKind` (how to build the module from the
config, and its loss on a batch) and a `DataKind` (a source whose `batch(step, ...)` returns
the process-local rows of global batch `step` as numpy arrays, and a config check) to these
tables; `train.py` and `eval.py` need no change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.experimental import multihost_utils

from attnjax import data, nn
from attnjax.data import text
from attnjax.data.shapes import Shapes
from attnjax.nn.seq_parallel import SeqParallel
from attnjax.nn.softmax_variants import AUX_LOSS
from attnjax.nn.vision import VisionTransformer, classification_loss


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
  """The mixers' sequence-parallel context on `mesh`: None unless it splits axis `seq`.

  Strategies come from `config.parallel`; the batch stays split over the mesh axes that
  `mesh.rules` gives the logical axis `batch`.
  """
  if mesh is None or mesh.shape["seq"] == 1:
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
