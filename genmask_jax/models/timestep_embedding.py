"""WAN's sinusoidal timestep embedding: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i / half).

The original computes it in float64; we compute the frequencies in float64 on the host and
the product in fp32 (as diffusers does). At t = 999 that differs from the float64 original
by at most ~3e-5 per entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Embeds timesteps of any shape (on the 0..1000 scale) into (..., dim) fp32 vectors."""
  half = dim // 2
  freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
  arg = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)
