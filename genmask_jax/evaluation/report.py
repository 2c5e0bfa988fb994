"""Evaluation output: per-split results as JSON and a console table, PNG overlay grids, and the
mask and overlay PNGs of predictions.

An overlay grid has one row per sample and three tiles per row: the image, the image with the
ground truth (green; ignored pixels grey) and the image with the prediction (red). Each tile is
the image letterboxed into tile x tile, so a grid of N samples is (3 tile) wide, (N tile) high.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from genmask_jax.data import masks, records
from genmask_jax.evaluation import metrics
from genmask_jax.runtime import fileio

COLUMNS = ("samples", "gIoU", "cIoU") + tuple(f"Prec@0.{k}" for k in metrics.PRECISION_TENTHS)
TRUTH_RGB, IGNORE_RGB, PREDICTION_RGB = (0, 200, 0), (128, 128, 128), (220, 0, 0)
ALPHA = 0.5

Results = Mapping[str, Mapping[str, float]]


UNITS = "gIoU (= mIoU), cIoU (= oIoU), Prec@t: fractions in [0, 1], as in results.json"


def format_table(results: Results) -> str:
  """A line naming the unit, a header and one row per split."""
  width = max([len("split")] + [len(s) for s in results])
  lines = [UNITS, "  ".join([f"{'split':<{width}}"] + [f"{c:>9}" for c in COLUMNS])]
  for split, r in results.items():
    cells = [f"{int(r['samples']):>9d}"] + [f"{r[c]:>9.4f}" for c in COLUMNS[1:]]
    lines.append("  ".join([f"{split:<{width}}"] + cells))
  return "\n".join(lines)


def write_results(results: Results, path: str) -> None:
  """Writes the results as JSON and prints them as a table, both in fractions."""
  fileio.makedirs(os.path.dirname(path) or ".")
  fileio.write_json(path, {split: dict(r) for split, r in results.items()}, indent=2)
  print(format_table(results))


def _letterbox(rgb: np.ndarray, tile: int, resample: Image.Resampling) -> np.ndarray:
  h, w = rgb.shape[:2]
  scale = tile / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  out = np.zeros((tile, tile, 3), np.uint8)
  resized = np.asarray(Image.fromarray(rgb).resize(size, resample))
  out[: size[1], : size[0]] = resized
  return out


def paint(image: np.ndarray, where: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
  blended = (1 - ALPHA) * image + ALPHA * np.asarray(rgb, np.float32)
  return np.where(where[..., None], blended, image).round().astype(np.uint8)


def save_masks(out: str, samples: Sequence[dict], predicted: Sequence[np.ndarray]) -> list[str]:
  """Writes query i's mask (0 / 255 at its image's size) and its image with the mask in red as
  `{out}/{i:03d}_{name}_mask.png` and `..._overlay.png`; returns the path prefixes."""
  fileio.makedirs(out)
  bases = []
  for i, (sample, mask) in enumerate(zip(samples, predicted, strict=True)):
    name = re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(sample["id"]))[0])
    bases.append(os.path.join(out, f"{i:03d}_{name}"))
    fileio.save_image(f"{bases[-1]}_mask.png", Image.fromarray(mask.astype(np.uint8) * 255))
    overlay = paint(records.decode_image(sample), mask, PREDICTION_RGB)
    fileio.save_image(f"{bases[-1]}_overlay.png", Image.fromarray(overlay))
  return bases


def overlay_row(
  image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, tile: int
) -> np.ndarray:
  """Three tiles (tile, 3 tile, 3) uint8: image (h, w, 3) uint8, truth (h, w) in {0, 1, 255},
  prediction (h, w) bool, all at the original size."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be (h, w, 3) uint8, got {image.shape} {image.dtype}")
  if truth.shape != image.shape[:2] or prediction.shape != image.shape[:2]:
    raise ValueError(
      f"image {image.shape[:2]}, truth {truth.shape} and prediction {prediction.shape} "
      "must share one (h, w)"
    )
  painted_truth = paint(image, truth == masks.FOREGROUND, TRUTH_RGB)
  painted_truth = paint(painted_truth, truth == masks.IGNORE, IGNORE_RGB)
  painted_prediction = paint(image, prediction.astype(bool), PREDICTION_RGB)
  tiles = [
    _letterbox(x, tile, Image.Resampling.NEAREST) for x in (painted_truth, painted_prediction)
  ]
  return np.concatenate([_letterbox(image, tile, Image.Resampling.BILINEAR), *tiles], axis=1)


def overlay_grid(
  samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], tile: int = 256
) -> Image.Image:
  """An RGB image (3 tile wide, N tile high) of N (image, truth, prediction) samples."""
  if not samples:
    raise ValueError("an overlay grid needs at least one sample")
  return Image.fromarray(np.concatenate([overlay_row(*s, tile) for s in samples], axis=0))


def write_overlay_grids(
  per_split: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]],
  directory: str,
  tile: int = 256,
) -> list[str]:
  """Writes `{directory}/{split}_overlays.png` per split; returns the paths."""
  fileio.makedirs(directory)
  paths = []
  for split, samples in per_split.items():
    paths.append(os.path.join(directory, f"{split}_overlays.png"))
    fileio.save_image(paths[-1], overlay_grid(samples, tile))
  return paths
