"""Classifier-free guidance: text dropout while training, guided velocity while sampling.

A dropped text is all-zero features with an all-False key mask; the sampler's unconditional
branch uses exactly that null text, so training and inference agree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from genmask_jax.diffusion.flow import VelocityFn


def null_text(
  context: jax.Array, context_mask: jax.Array | None, drop: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
  """Zeroes the features and key mask of the samples where `drop` (B,) is True."""
  keep = ~drop
  context = context * keep[:, None, None].astype(context.dtype)
  if context_mask is not None:
    context_mask = context_mask & keep[:, None]
  return context, context_mask


def drop_text(
  rng: jax.Array, context: jax.Array, context_mask: jax.Array | None, rate: float
) -> tuple[jax.Array, jax.Array | None]:
  """Drops each sample's text with probability `rate` (generation samples, for guidance)."""
  drop = jax.random.bernoulli(rng, rate, context.shape[:1])
  return null_text(context, context_mask, drop)


def guided_velocity(
  velocity_fn: VelocityFn,
  params: Any,
  x: jax.Array,
  t_dit: jax.Array,
  context: jax.Array,
  context_mask: jax.Array | None,
  guidance_scale: jax.Array | float,
) -> jax.Array:
  """v_u + g (v_c - v_u), the conditional and unconditional passes in one batched forward."""
  batch = x.shape[0]
  null_context, null_mask = null_text(context, context_mask, jnp.ones((batch,), bool))
  both = lambda a, b: None if a is None else jnp.concatenate([a, b])
  v = velocity_fn(
    params,
    both(x, x),
    both(t_dit, t_dit),
    both(context, null_context),
    both(context_mask, null_mask),
    None,
  )
  v_cond, v_uncond = v[:batch], v[batch:]
  return v_uncond + guidance_scale * (v_cond - v_uncond)
