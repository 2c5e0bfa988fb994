"""COCO-format annotation masks, rasterized exactly as pycocotools does."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from genmask_jax.data.records import RecordError


def rasterize(segmentation: Any, height: int, width: int) -> np.ndarray:
  """uint8 (height, width) in {0, 1}: polygons (merged into one RLE) or an RLE."""
  if isinstance(segmentation, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
    rle = mask_utils.frPyObjects(segmentation, height, width)  # Uncompressed RLE.
  elif isinstance(segmentation, dict) and "counts" in segmentation:
    counts = segmentation["counts"]
    rle = dict(segmentation, counts=counts.encode() if isinstance(counts, str) else counts)
  else:
    raise RecordError(f"unknown COCO segmentation of type {type(segmentation).__name__}")
  # Summed rasters can hold 2 where parts overlap; a mask is binary.
  return np.minimum(mask_utils.decode(rle), 1).astype(np.uint8)
