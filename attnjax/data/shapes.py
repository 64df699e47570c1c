"""Synthetic shapes: a small image-classification task generated offline, example by example.

Each example is a `size x size` grayscale image holding one shape of a random size, position
and brightness on a noisy background; the label is the shape's class:

  0 filled square, 1 hollow square, 2 plus sign, 3 diagonal cross (x).

Pixels are quantized to int32 0..255 (`inputs [size, size]`), the label is `targets [1]` with
`weights [1]`, so batches follow the `ExampleTask` contract of every attnjax data source.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax.data.source import ExampleTask

CLASSES = ("filled_square", "hollow_square", "plus", "cross")


@dataclasses.dataclass(frozen=True)
class Shapes(ExampleTask):
  """Images of `image_size` pixels, shapes `min_extent`..`max_extent` wide, noise std `noise`."""

  image_size: int = 32
  min_extent: int = 9
  max_extent: int = 17
  noise: float = 0.1
  patch_size: int = 4  # only sets `seq_len`, the tokens per image of a patch model

  def __post_init__(self):
    if not 3 <= self.min_extent <= self.max_extent <= self.image_size:
      raise ValueError(
        f"need 3 <= min_extent <= max_extent <= image_size, got min_extent={self.min_extent}, "
        f"max_extent={self.max_extent}, image_size={self.image_size}"
      )
    if self.patch_size < 1 or self.image_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")

  @property
  def num_classes(self) -> int:
    return len(CLASSES)

  @property
  def seq_len(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    label = int(rng.integers(self.num_classes))
    extent = int(rng.integers(self.min_extent, self.max_extent + 1))
    top, left = rng.integers(0, self.image_size - extent + 1, size=2)
    rows, cols = np.mgrid[:extent, :extent]
    thickness = max(1, extent // 5)
    center = extent // 2
    if label == 0:
      shape = np.ones((extent, extent), bool)
    elif label == 1:
      inner = (rows >= thickness) & (rows < extent - thickness)
      shape = ~(inner & (cols >= thickness) & (cols < extent - thickness))
    elif label == 2:
      shape = (np.abs(rows - center) < thickness) | (np.abs(cols - center) < thickness)
    else:
      shape = (np.abs(rows - cols) < thickness) | (np.abs(rows + cols - (extent - 1)) < thickness)
    image = rng.normal(0.2, self.noise, (self.image_size, self.image_size))
    image[top : top + extent, left : left + extent] += shape * rng.uniform(0.5, 0.8)
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.int32)
    return {
      "inputs": pixels,
      "targets": np.array([label]),
      "weights": np.ones(1, np.float32),
    }
