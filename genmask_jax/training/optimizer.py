"""AdamW with fp32 moments, linear warm-up then cosine decay, and global-norm clipping; an
optional exponential moving average of the parameters (`ema_decay` > 0; not in the paper's
recipe), which evaluation and inference then use."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> `lr` over `warmup_steps`, then cosine to `min_lr` at `total_steps` (paper: 5e-5, 1e-5)."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.lr,
    warmup_steps=config.warmup_steps,
    decay_steps=max(config.total_steps, config.warmup_steps + 1),
    end_value=config.min_lr,
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`config` holds lr, min_lr, warmup_steps, total_steps, b1, b2, eps, weight_decay, grad_clip."""
  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    optax.adamw(
      learning_rate(config),
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mu_dtype=jnp.float32,
    ),
  )


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
  """The moving average after the update to `step`: the decay ramps up as min(decay,
  (1 + step) / (10 + step)), so early averages do not hold on to the initialization."""
  rate = 1 - jnp.minimum(decay, (1 + step) / (10 + step))
  return jax.tree.map(lambda e, p: e + rate * (p - e), ema, params)
