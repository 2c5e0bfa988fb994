"""The model's square input and back: resize and pad an image, undo both on predicted logits.

`resize_and_pad` resizes an (h, w) image so that its longer side is S (the resized (rh, rw),
`resized_shape`) and pads it at the bottom / right to S x S; the model predicts logits at
S x S. `undo_resize` keeps their top-left (rh, rw) block and resizes those LOGITS bilinearly to
(h, w) (half-pixel centres, edge pixels clamped, no antialiasing: torch
`F.interpolate(..., align_corners=False)` and cv2 INTER_LINEAR alike); thresholding at 0 then
gives the mask at the original resolution. Resizing logits rather than binary masks keeps
sub-pixel boundaries.

Both work on one sample in numpy and cv2 on the host (no JAX: grain workers preprocess with
them): originals differ in size, so a batch is ragged and a jitted function would compile once
per size. evaluation/reduce.py holds the device variant of `undo_resize` for batches scored
against ground truth padded to one fixed size.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
  """(h, w) with the longer side `resolution` and the aspect ratio kept."""
  scale = resolution / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize_and_pad(array: np.ndarray, resolution: int, nearest: bool) -> np.ndarray:
  """Longer side to `resolution`, then zero-padded at the bottom / right to a square."""
  h, w = array.shape[:2]
  rh, rw = resized_shape(h, w, resolution)
  if nearest:
    method = cv2.INTER_NEAREST
  else:  # Area averaging when shrinking avoids aliasing; bilinear when enlarging.
    method = cv2.INTER_AREA if rh < h else cv2.INTER_LINEAR
  out = np.zeros((resolution, resolution) + array.shape[2:], array.dtype)
  out[:rh, :rw] = cv2.resize(array, (rw, rh), interpolation=method)
  return out


def _check_sizes(square: int, original_hw: Sequence[int], resized_hw: Sequence[int]) -> None:
  (h, w), (rh, rw) = original_hw, resized_hw
  if min(h, w, rh, rw) < 1 or rh > square or rw > square:
    raise ValueError(
      f"original size {(h, w)} / resized size {(rh, rw)} do not fit logits of {square}x{square}"
    )


def undo_resize(
  logits: np.ndarray, original_hw: Sequence[int], resized_hw: Sequence[int]
) -> np.ndarray:
  """Logits (S, S) -> logits (h, w) float32 at the original size."""
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
    raise ValueError(f"logits must be square (S, S), got shape {logits.shape}")
  _check_sizes(logits.shape[0], original_hw, resized_hw)
  (h, w), (rh, rw) = (int(v) for v in original_hw), (int(v) for v in resized_hw)
  valid = np.ascontiguousarray(logits[:rh, :rw], np.float32)
  return cv2.resize(valid, (w, h), interpolation=cv2.INTER_LINEAR)
