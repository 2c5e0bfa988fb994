"""Baselines the demo scores segmentation against: masks that ignore the text.

"every shape": every pixel that differs from the scene's (uniform, most frequent) background;
"largest shape": the largest connected region of those. mIoU, oIoU and Prec@0.5 per split, as
evaluation reports them.
"""

from __future__ import annotations

import cv2
import numpy as np

from genmask_jax.data import records
from genmask_jax.evaluation import metrics


def foreground(image: np.ndarray) -> np.ndarray:
  """Shape pixels: everything that differs from the (uniform, most frequent) background."""
  colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
  return np.any(image != colors[np.argmax(counts)], axis=-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
  if count <= 1:
    return mask
  return labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])


def baselines(records_dir: str) -> dict[str, dict[str, float]]:
  """mIoU of predicting every shape, and of predicting the largest shape, per sample."""
  reader = records.RecordReader(records_dir)
  rules = {"every shape": foreground, "largest shape": lambda x: largest_component(foreground(x))}
  results = {}
  for name, rule in rules.items():
    pairs = [
      metrics.intersection_union(rule(records.decode_image(s)), records.decode_mask(s))
      for s in map(reader.__getitem__, range(len(reader)))
    ]
    results[name] = metrics.IoUSums.of_samples(*map(np.array, zip(*pairs, strict=True))).results()
  return results
