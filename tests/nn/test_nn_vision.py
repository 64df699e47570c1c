"""The vision transformer: shapes, pixel scaling, every local mixer, the classification loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision import VisionTransformer, classification_loss


def _model(pattern="neighborhood", options=None, **kwargs):
  return VisionTransformer(
    image_size=16,
    patch_size=4,
    num_classes=3,
    embed_dim=16,
    depth=2,
    num_heads=2,
    mlp_dim=32,
    layer_pattern=pattern,
    mixer_options=options or {"neighborhood": {"kernel_size": 3}},
    rngs=nnx.Rngs(0),
    **kwargs,
  )


def test_logits_and_loss():
  model = _model(
    "neighborhood,halo",
    {"neighborhood": {"kernel_size": 3}, "halo": {"block_size": 2, "halo_size": 1}},
  )
  pixels = jax.random.randint(jax.random.PRNGKey(1), (4, 16, 16), 0, 256)
  batch = {
    "inputs": pixels,
    "targets": jnp.array([[0], [1], [2], [1]]),
    "weights": jnp.array([[1.0], [1.0], [1.0], [0.0]]),
  }

  @nnx.jit
  def run(model, batch):
    scaled = model(batch["inputs"].astype(jnp.float32) / 255.0)
    return model(batch["inputs"]), scaled, classification_loss(model, batch)

  _, _, (loss, sums) = run(model, batch)
  model.head[...] = jax.random.normal(jax.random.PRNGKey(2), model.head.shape)
  logits, scaled, _ = run(model, batch)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  # The head starts at zero: uniform predictions, loss log(3) over the 3 weighted rows.
  np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-5)
  assert float(sums["weight_sum"]) == 3.0
  assert np.abs(logits).max() > 0.1  # integer pixels are read as 0..255 and scaled
  np.testing.assert_allclose(scaled, logits, rtol=1e-4, atol=1e-5)


def test_bad_images_raise():
  with pytest.raises(ValueError, match="images must be"):
    _model()(jnp.zeros((2, 12, 16)))
  with pytest.raises(ValueError, match="patch_size"):
    VisionTransformer(image_size=15, patch_size=4, num_classes=2, embed_dim=8, depth=1,
                      num_heads=1, mlp_dim=0, rngs=nnx.Rngs(0))  # fmt: skip
