"""Text-to-image generation: Euler integration of the flow ODE from noise (t = 1) to data.

WAN's schedule: sigma = linspace(0.999, 0, N + 1)[:-1], time-shifted by `shift` (> 1 spends
more steps at high noise), then a final 0. Each step is one batched DiT forward carrying the
conditional and the unconditional (null text) halves for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from genmask_jax.diffusion import flow, guidance, timesteps

SIGMA_MAX = 0.999


def flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
  """The N + 1 noise levels from ~1 down to 0 (float32)."""
  sigmas = np.linspace(SIGMA_MAX, 0.0, num_steps + 1)[:-1]
  # time_shift with 1 / shift is WAN's shift * sigma / (1 + (shift - 1) * sigma).
  sigmas = timesteps.time_shift(sigmas, 1.0 / shift)
  return np.append(sigmas, 0.0).astype(np.float32)


def generate(
  velocity_fn: flow.VelocityFn,
  params: Mapping[str, Any],
  noise: jax.Array,
  context: jax.Array,
  context_mask: jax.Array | None,
  guidance_scale: jax.Array | float,
  *,
  num_steps: int,
  shift: float,
) -> jax.Array:
  """Image latents (B, 1, h, w, C) sampled from standard-normal `noise` of that shape.

  guidance_scale may be traced (sweeping it does not recompile); num_steps and shift fix the
  schedule and are static.
  """
  sigmas = jnp.asarray(flow_sigmas(num_steps, shift))
  batch = noise.shape[0]

  def euler_step(i, x):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    t_dit = flow.dit_timesteps(jnp.full((batch,), sigma))
    v = guidance.guided_velocity(
      velocity_fn, params["dit"], x, t_dit, context, context_mask, guidance_scale
    )
    return x + (sigma_next - sigma) * v.astype(jnp.float32)

  return jax.lax.fori_loop(0, num_steps, euler_step, noise.astype(jnp.float32))
