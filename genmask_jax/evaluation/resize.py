"""Undo the input's resize and pad on predicted mask logits, so masks are scored at the
original resolution.

The pipeline resizes an (h, w) image so its longest side is S (giving the resized (rh, rw)) and
pads bottom/right to S x S; the model predicts logits at S x S. Undoing it: keep the top-left
(rh, rw) block, resize those LOGITS bilinearly to (h, w) (half-pixel centres, edge pixels
clamped, no antialiasing: torch `F.interpolate(..., align_corners=False)` and cv2 INTER_LINEAR
alike), then threshold at 0. Resizing logits rather than binary masks keeps sub-pixel
boundaries.

`undo_resize` works on one sample in numpy on the host: originals differ in size, so a batch
is ragged and a jitted function would compile once per size. `undo_resize_padded` is the
device variant for a batch scored against ground truth padded to one fixed (H, W): the
per-sample scale is a traced value, so it compiles once.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np


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


def undo_resize_padded(
  logits: jax.Array, original_hw: jax.Array, resized_hw: jax.Array, out_hw: Sequence[int]
) -> jax.Array:
  """Logits (B, S, S), sizes (B, 2) int -> logits (B, H, W) float32 with sample b's
  original-size logits in the top-left (h_b, w_b) block; what lies outside is unspecified."""
  square = logits.shape[-1]
  if logits.ndim != 3 or logits.shape[1] != square:
    raise ValueError(f"logits must be (B, S, S), got shape {logits.shape}")

  def one(x, hw, rhw):
    # Repeat the last valid row/column over the padding, so interpolating at the valid
    # block's edge clamps like cropping does instead of blending in padded logits.
    rows = jnp.minimum(jnp.arange(square), rhw[0] - 1)
    cols = jnp.minimum(jnp.arange(square), rhw[1] - 1)
    x = x[rows][:, cols].astype(jnp.float32)
    scale = hw.astype(jnp.float32) / rhw.astype(jnp.float32)
    return jax.image.scale_and_translate(
      x, tuple(out_hw), (0, 1), scale, jnp.zeros(2), "linear", antialias=False
    )

  return jax.vmap(one)(logits, original_hw, resized_hw)
