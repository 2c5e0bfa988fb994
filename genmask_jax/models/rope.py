"""WAN's 3-D rotary position embedding (frame, height, width).

The head dimension d is split into d - 4(d//6), 2(d//6), 2(d//6) channels for the frame,
height and width axes; each axis has its own inverse frequencies 1 / 10000^(2j / dim_axis).
Adjacent channels (2i, 2i + 1) form the (real, imaginary) parts of one rotation. Tables are
built in float64 on the host (positions depend on shapes only) and applied in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels rotated by the frame, height and width positions."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def grid_positions(frames: int, height: int, width: int, frame_start: int = 0) -> np.ndarray:
  """(f, h, w) positions of a token grid in row-major order, shape (F * H * W, 3)."""
  f, h, w = np.meshgrid(
    np.arange(frame_start, frame_start + frames), np.arange(height), np.arange(width), indexing="ij"
  )
  return np.stack([f.ravel(), h.ravel(), w.ravel()], axis=-1)


def cos_sin(
  positions: np.ndarray, head_dim: int, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
  """Rotation tables (L, head_dim // 2) for integer positions (L, 3), as fp32."""
  angles = []
  for axis, dim in enumerate(axis_dims(head_dim)):
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles.append(positions[:, axis, None].astype(np.float64) * inv_freq)
  angle = np.concatenate(angles, axis=-1)
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x (B, L, H, D) by the tables (L, D // 2); returns fp32."""
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = x[..., 0], x[..., 1]
  cos, sin = cos[:, None, :], sin[:, None, :]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(*out.shape[:-2], -1)
