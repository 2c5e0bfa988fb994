"""Does a generated image show the colours its caption names? A toy-scale measure of generation.

For scenes drawn in a known palette (the synthetic set's), each pixel within `tolerance` (RGB
distance) of a palette colour counts for the nearest one; a colour is present when it covers at
least `min_fraction` of the image (the synthetic set's smallest shape covers ~1.6% of it).
Recall: of the colours the captions name, the fraction present; precision: of the colours
present, the fraction named. Both are pooled over all images (micro-averaged).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

Palette = Mapping[str, tuple[int, int, int]]


def present_colours(
  image: np.ndarray, palette: Palette, tolerance: float = 60.0, min_fraction: float = 0.005
) -> set[str]:
  """The palette colours covering at least `min_fraction` of an RGB uint8 image (H, W, 3)."""
  names = list(palette)
  colours = np.asarray([palette[n] for n in names], np.float32)
  distance = np.linalg.norm(image.reshape(-1, 1, 3).astype(np.float32) - colours, axis=-1)
  nearest = np.where(distance.min(axis=1) <= tolerance, distance.argmin(axis=1), -1)
  counts = np.bincount(nearest[nearest >= 0], minlength=len(names))
  return {n for n, c in zip(names, counts, strict=True) if c >= min_fraction * len(nearest)}


def named_colours(caption: str, palette: Palette) -> set[str]:
  return set(re.findall(r"[a-z]+", caption.lower())) & set(palette)


def colour_scores(
  images: Sequence[np.ndarray], captions: Sequence[str], palette: Palette, **present_kwargs
) -> dict[str, float]:
  """{"recall", "precision"} of the named colours over (image, caption) pairs."""
  hits = named = present = 0
  for image, caption in zip(images, captions, strict=True):
    shown, asked = (
      present_colours(image, palette, **present_kwargs),
      named_colours(caption, palette),
    )
    hits, named, present = hits + len(shown & asked), named + len(asked), present + len(shown)
  return {"recall": hits / max(named, 1), "precision": hits / max(present, 1)}
