"""Rectified flow: the straight path from data x0 (t = 0) to noise eps (t = 1).

`x_t = (1 - t) x0 + t eps`, velocity `v = dx_t/dt = eps - x0`, hence `x0 = x_t - t v`.
t has one value per sample, shape (B,), broadcast over the latent (B, F, H, W, C).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

# The DiT as the flow sees it: (params, x_t, t_dit, context, context_mask, cond) -> v, with
# x_t (B, F, H, W, C), t_dit (B,) on the 0..1000 scale, context (B, S, D), context_mask (B, S)
# bool or None, cond (B, Fc, Hc, Wc, C) clean condition latents or None; v shaped like x_t.
VelocityFn = Callable[..., jax.Array]

DIT_TIME_SCALE = 1000.0  # WAN's time embedding expects timesteps on the 0..1000 scale.


def _per_sample(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def noisy_latents(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t eps."""
  t = _per_sample(t, x0)
  return (1 - t) * x0 + t * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """v = eps - x0, the constant velocity of the straight path."""
  return eps - x0


def clean_estimate(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """x0_hat = x_t - t v: where the predicted velocity leads at t = 0."""
  return x_t - _per_sample(t, x_t) * v


def dit_timesteps(t: jax.Array) -> jax.Array:
  """The DiT's timestep input for flow time t."""
  return DIT_TIME_SCALE * t
