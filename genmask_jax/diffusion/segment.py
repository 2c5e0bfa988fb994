"""One-step segmentation (paper Eq. 8): one DiT forward at a fixed t, no CFG.

The mask latent is unknown, so the DiT input is the noisy latent at time t of its prior mean
0, `x_t = t eps` (pure noise at the default t = 1); `x0_hat = x_t - t v_hat` is then decoded to
mask logits (positive = foreground). The noise is one seeded draw shared by every sample, so a
sample's mask does not depend on its batch, its position in it, or the device mesh. With
`steps` > 1 the path from t to 0 is taken in that many equal Euler steps instead (one DiT
forward each; benchmarks/one_step.py measures what it buys).

config keys: t (default 1.0), noise ("gaussian" | "zeros"), seed, decoder ("vae" | "linear"),
steps (default 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from genmask_jax.diffusion import flow, mask_decoders

NOISE = ("gaussian", "zeros")


def one_step_latents(
  velocity_fn: flow.VelocityFn,
  params: Mapping[str, Any],
  cond: jax.Array,
  context: jax.Array,
  context_mask: jax.Array | None,
  *,
  config: ml_collections.ConfigDict,
) -> jax.Array:
  """Clean mask latents x0_hat predicted for image latents `cond` (B, 1, h, w, C), same shape."""
  shape = (1,) + cond.shape[1:]
  if config.noise == "gaussian":
    eps = jax.random.normal(jax.random.key(config.seed), shape, jnp.float32)
  elif config.noise == "zeros":
    eps = jnp.zeros(shape, jnp.float32)
  else:
    raise ValueError(f"segmentation noise {config.noise!r} unknown; expected one of {NOISE}")
  eps = jnp.broadcast_to(eps, cond.shape)
  steps = config.get("steps", 1)
  if steps < 1:
    raise ValueError(f"segmentation steps must be >= 1, got {steps}")
  x = flow.noisy_latents(
    jnp.zeros_like(eps), eps, jnp.full((cond.shape[0],), config.t, jnp.float32)
  )
  for i in range(steps):
    t_now, t_next = (config.t * (steps - k) / steps for k in (i, i + 1))
    t = jnp.full((cond.shape[0],), t_now, jnp.float32)
    v_hat = velocity_fn(params["dit"], x, flow.dit_timesteps(t), context, context_mask, cond)
    # An Euler step to t_next; the last one (t_next = 0) is the clean estimate x - t v.
    x = flow.clean_estimate(x, v_hat.astype(jnp.float32), t - t_next)
  return x


def segment(
  velocity_fn: flow.VelocityFn,
  params: Mapping[str, Any],
  cond: jax.Array,
  context: jax.Array,
  context_mask: jax.Array | None,
  *,
  config: ml_collections.ConfigDict,
  vae_params: Any = None,
  vae_mask_logits: mask_decoders.VaeMaskLogitsFn | None = None,
) -> jax.Array:
  """Mask logits (B, s h, s w), s the VAE stride, for image latents `cond` (B, 1, h, w, C)."""
  latents = one_step_latents(velocity_fn, params, cond, context, context_mask, config=config)
  return mask_decoders.decode_mask_logits(
    latents,
    config.decoder,
    head_params=params.get("mask_head"),
    vae_params=vae_params,
    vae_mask_logits=vae_mask_logits,
  )
