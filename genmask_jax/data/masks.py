"""Binary masks as the black-and-white RGB images the VAE sees, and back.

A mask pixel 1 (foreground) is white (+1 in every channel), anything else is black (-1):
0 is background and the ignore label 255 is treated as background too. A decoded image, taken
before the VAE's clip to [-1, 1], is read back as per-pixel logits = LOGIT_SCALE x the mean
over its three channels: 0 halfway between black and white, so `logits > 0` is the predicted
foreground. The fixed scale maps white and black to probabilities sigmoid(+-5) = 0.993 / 0.007:
with the channel mean alone, BCE could not push a pixel past 0.73 (the paper's VAE-BCE format
trains through these logits); and with the clip, pixels beyond [-1, 1] got no gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Mask pixel values, in every store, batch, loss and metric.
BACKGROUND = 0
FOREGROUND = 1
IGNORE = 255  # Counted in neither the loss nor the metrics.
VALUES = (BACKGROUND, FOREGROUND, IGNORE)

LOGIT_SCALE = 5.0


def mask_to_image(mask: Any) -> Any:
  """Masks (B, H, W) with values {0, 1, 255} -> images (B, H, W, 3) in {-1, +1}, fp32; numpy
  or jax arrays alike (array methods only, so data preparation needs no JAX)."""
  if mask.ndim != 3:
    raise ValueError(f"mask must be (B, H, W), got shape {mask.shape}")
  white = (mask == FOREGROUND).astype(np.float32) * 2 - 1
  return white[..., None].repeat(3, axis=-1)


def image_to_mask_logits(image: Any) -> Any:
  """Decoded images (B, H, W, 3), unclipped -> foreground logits (B, H, W), fp32."""
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"image must be (B, H, W, 3), got shape {image.shape}")
  return LOGIT_SCALE * image.astype(np.float32).mean(axis=-1)
