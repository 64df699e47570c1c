"""A small isotropic vision transformer whose 2-D token mixer is chosen by registry name.

    image [batch, H, W] -> patches (p x p) -> linear + learned positions
      -> depth x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> mean over tokens -> logits

Every layer's mixer is `registry.mixer_class(name)(embed_dim, ..., spatial_shape=(H/p, W/p),
**mixer_options[name])`, so any 2-D local-attention variant (neighborhood, halo, maxvit,
biformer) plugs in by name; ViT (Dosovitskiy et al. 2021, arXiv 2010.11929) layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnjax import registry
from attnjax.nn.lm import Block, parse_layer_pattern
from attnjax.nn.norm import RMSNorm
from attnjax.nn.params import fan_in_init, param


class VisionTransformer(nnx.Module):
  """Images `[batch, H, W]` (or `[batch, H, W, channels]`) -> float32 logits `[batch, classes]`.

  Integer images are read as 0..255 pixels and scaled to [0, 1].
  """

  def __init__(
    self,
    *,
    image_size: int,
    patch_size: int,
    num_classes: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    rngs: nnx.Rngs,
    channels: int = 1,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    layer_pattern: str | Sequence[str] = ("neighborhood",),
    mixer_options: Mapping[str, Mapping] | None = None,
    dtype=jnp.float32,
  ):
    if patch_size < 1 or image_size % patch_size:
      raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
    self.layer_names = parse_layer_pattern(layer_pattern, depth)
    mixer_options = dict(mixer_options or {})
    self.patch_size, self.channels, self.dtype = patch_size, channels, dtype
    self.grid = (image_size // patch_size,) * 2
    num_tokens = self.grid[0] * self.grid[1]
    self.patch_embed = param(
      rngs, fan_in_init(), (patch_size * patch_size * channels, embed_dim), (None, "embed")
    )
    self.positions = param(
      rngs, nnx.initializers.normal(0.02), (num_tokens, embed_dim), ("seq", "embed")
    )
    blocks = []
    for name in self.layer_names:
      mixer = registry.mixer_class(name)(
        embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        variant=name,
        rngs=rngs,
        spatial_shape=self.grid,
        **mixer_options.get(name, {}),
      )
      blocks.append(Block(embed_dim, mlp_dim, mixer, rngs=rngs, dtype=dtype))
    self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(embed_dim, rngs=rngs)
    self.head = param(rngs, nnx.initializers.zeros, (embed_dim, num_classes), ("embed", None))

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim == 3:
      images = images[..., None]
    expected = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size, self.channels)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must be [batch, *{expected}], got shape {images.shape}")
    x = images.astype(self.dtype)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x / 255.0
    b, p = images.shape[0], self.patch_size
    patches = x.reshape(b, self.grid[0], p, self.grid[1], p, self.channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * self.channels)
    x = patches @ self.patch_embed[...].astype(self.dtype) + self.positions[...].astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.final_norm(x).mean(axis=1)
    return jnp.dot(x, self.head[...].astype(self.dtype), preferred_element_type=jnp.float32)


def classification_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of `model(batch["inputs"])` against `targets [batch, 1]`, weighted.

  Returns the mean loss and the metric sums `loss_sum`, `correct_sum`, `weight_sum` that the
  trainer and the `loss` evaluator read.
  """
  logits = model(batch["inputs"])
  labels, weights = batch["targets"][:, 0], batch["weights"][:, 0]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  sums = {
    "loss_sum": jnp.sum(losses * weights),
    "correct_sum": jnp.sum(correct * weights),
    "weight_sum": jnp.sum(weights),
  }
  return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums
