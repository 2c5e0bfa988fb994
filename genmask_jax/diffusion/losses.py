"""The training loss of a one-task batch under rectified flow.

The task is static (the train step calls the loss once per task sub-batch): it picks the
timestep sampler, whether texts are dropped and the supervision. Each sample draws t from its
task's sampler, is noised along the straight path and the DiT predicts the velocity.
Generation samples are always supervised by MSE on v. Segmentation samples use one of the
paper's three formats (Tab. 4), `config.segmentation_loss`:
  "mse":        MSE on v in latent space (the paper's best);
  "vae_bce":    BCE on mask logits after decoding x0_hat = x_t - t v_hat with the frozen VAE;
  "linear_bce": BCE on mask logits from the learnable LinearMaskHead applied to x0_hat.
Pixels marked IGNORE in the target mask do not count in BCE.

config keys: timesteps.segmentation, timesteps.generation (see `timesteps.timestep_sampler`),
segmentation_loss, text_dropout (probability of dropping a generation sample's text, for CFG).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from genmask_jax.data import tasks
from genmask_jax.data.masks import FOREGROUND, IGNORE
from genmask_jax.diffusion import flow, guidance, mask_decoders, timesteps

SUPERVISIONS = {"mse": None, "vae_bce": "vae", "linear_bce": "linear"}  # -> mask decoder


def masked_bce(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-sample mean BCE over the non-IGNORE pixels of masks (B, H, W) with values 0 / 1."""
  if logits.shape != mask.shape:
    raise ValueError(f"mask logits {logits.shape} and target masks {mask.shape} differ in shape")
  valid = mask != IGNORE
  per_pixel = optax.sigmoid_binary_cross_entropy(logits, (mask == FOREGROUND).astype(logits.dtype))
  total = jnp.sum(jnp.where(valid, per_pixel, 0.0), axis=(1, 2))
  return total / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1)


def training_loss(
  velocity_fn: flow.VelocityFn,
  params: Mapping[str, Any],
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  task: int,
  config: ml_collections.ConfigDict,
  vae_params: Any = None,
  vae_mask_logits: mask_decoders.VaeMaskLogitsFn | None = None,
) -> jax.Array:
  """Mean per-sample loss of a batch of one task.

  task: `tasks.SEGMENTATION` or `tasks.GENERATION`, static.
  params: the trainable tree, {"dit": ..., "mask_head": ...} ("mask_head" for linear_bce).
  batch: "latents" (B, 1, h, w, C) clean targets (mask or image latents), "context" (B, S, D),
  optional "context_mask" (B, S) and "cond" (B, 1, h, w, C) clean image latents, and for a
  segmentation batch under the BCE formats "mask" (B, s h, s w), s the VAE stride.
  vae_params, vae_mask_logits: the frozen VAE decoder for vae_bce.
  """
  if task not in range(len(tasks.NAMES)):
    raise ValueError(f"task {task!r} unknown; expected an index of {tasks.NAMES}")
  if config.segmentation_loss not in SUPERVISIONS:
    raise ValueError(
      f"segmentation_loss {config.segmentation_loss!r} unknown; expected one of "
      f"{sorted(SUPERVISIONS)}"
    )
  decoder = SUPERVISIONS[config.segmentation_loss] if task == tasks.SEGMENTATION else None
  required = ("latents", "context") + (("mask",) if decoder else ())
  for key in required:
    if key not in batch:
      raise KeyError(f"training batch lacks {key!r}; it has {sorted(batch)}")

  x0 = batch["latents"].astype(jnp.float32)
  rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
  sampler = timesteps.timestep_sampler(config.timesteps[tasks.NAMES[task]])
  t = sampler.icdf(jax.random.uniform(rng_t, x0.shape[:1], jnp.float32))
  eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
  x_t = flow.noisy_latents(x0, eps, t)
  context, context_mask = batch["context"], batch.get("context_mask")
  if task == tasks.GENERATION:  # Segmentation is never guided, so it keeps its text.
    context, context_mask = guidance.drop_text(rng_drop, context, context_mask, config.text_dropout)
  v_hat = velocity_fn(
    params["dit"], x_t, flow.dit_timesteps(t), context, context_mask, batch.get("cond")
  ).astype(jnp.float32)

  if decoder:
    logits = mask_decoders.decode_mask_logits(
      flow.clean_estimate(x_t, v_hat, t),
      decoder,
      head_params=params.get("mask_head"),
      vae_params=vae_params,
      vae_mask_logits=vae_mask_logits,
    )
    return jnp.mean(masked_bce(logits, batch["mask"]))
  error = jnp.square(v_hat - flow.velocity_target(x0, eps))
  return jnp.mean(jnp.mean(error, axis=tuple(range(1, error.ndim))))
