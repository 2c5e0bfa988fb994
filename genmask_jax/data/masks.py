"""Binary masks as the black-and-white RGB images the VAE sees, and back.

A mask pixel 1 (foreground) is white (+1 in every channel), anything else is black (-1):
0 is background and the ignore label 255 is treated as background too. A decoded image is
read back as per-pixel logits = the mean over its three channels, 0 halfway between black and
white, so `logits > 0` is the predicted foreground.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FOREGROUND = 1


def mask_to_image(mask: jax.Array) -> jax.Array:
  """Masks (B, H, W) with values {0, 1, 255} -> images (B, H, W, 3) in {-1, +1}, fp32."""
  if mask.ndim != 3:
    raise ValueError(f"mask must be (B, H, W), got shape {mask.shape}")
  white = jnp.where(mask == FOREGROUND, 1.0, -1.0).astype(jnp.float32)
  return jnp.broadcast_to(white[..., None], (*mask.shape, 3))


def image_to_mask_logits(image: jax.Array) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1] -> foreground logits (B, H, W), fp32: the channel mean."""
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"image must be (B, H, W, 3), got shape {image.shape}")
  return jnp.mean(image.astype(jnp.float32), axis=-1)
