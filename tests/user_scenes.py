"""Training scenes of the synthetic set redrawn at another size, as a user's images, and how much
of each shape a predicted mask covers (tests/test_run_inference.py, tests/test_full_demo.py)."""

import cv2
import numpy as np
from PIL import Image

from genmask_jax.data import records, synthetic


def read_mask(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image) > 0


def shape_coverage(image: np.ndarray, predicted: np.ndarray, target: np.ndarray) -> list[float]:
  """The fraction of each shape (connected region off the background color) inside the
  predicted mask: the target's first."""
  colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
  shapes = np.any(image != colors[np.argmax(counts)], axis=-1)
  count, labels = cv2.connectedComponents(shapes.astype(np.uint8))
  first = np.bincount(labels[target]).argmax()
  order = [first] + [j for j in range(1, count) if j != first]
  return [float(predicted[labels == j].mean()) for j in order]


def user_scene(index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, str]:
  """Training scene `index` redrawn at (height, width) (nearest neighbour): the image, its
  target's mask and the expression."""
  sample = synthetic.segmentation_sample("train", index)
  rows = np.arange(height) * 64 // height
  cols = np.arange(width) * 64 // width
  image = records.decode_image(sample)[rows][:, cols]
  target = records.decode_mask(sample)[rows][:, cols] > 0
  return image, target, sample["text"]
