"""Using a trained GenMask model: restoring its weights, one-step segmentation, generation."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from genmask_jax.conversion import weights
from genmask_jax.diffusion import generate, segment
from genmask_jax.models.genmask import Models, frozen_vae_params
from genmask_jax.models.vae import spatial_stride
from genmask_jax.runtime import fileio, sharding
from genmask_jax.training import checkpointing


def restore_params(config: ml_collections.ConfigDict, workdir: str, models: Models, mesh, rules):
  """(trainable params, VAE params) for inference, in their shardings.

  The trainable parameters come from the latest training checkpoint under `workdir` (their
  moving average when `config.ema_decay` > 0), or, when there is none, from the converted
  weights `config.init.weights`.
  """
  boxed = jax.eval_shape(models.init_params, jax.random.key(0))
  abstract, _ = sharding.abstract_with_shardings(boxed, mesh, rules)
  directory = os.path.join(workdir, "checkpoints")
  params = None
  if fileio.isdir(directory):
    ckpt = checkpointing.TrainCheckpoints(directory, keep=1, every=1, async_save=False)
    step = ckpt.latest_step()
    if step is not None:
      item = "ema_params" if config.optimizer.get("ema_decay", 0.0) else "params"
      params = ckpt.restore_params(step, abstract, item)
      logging.info("model: %s of step %d under %s", item, step, directory)
    ckpt.close()
  if params is None:
    if not config.init.weights or models.mask_head is not None:
      raise FileNotFoundError(
        f"no training checkpoint under {directory} and no converted weights "
        "(config.init.weights) to run the model with"
      )
    params = {"dit": weights.restore(config.init.weights, "dit", abstract["dit"])}
    logging.info("model: converted weights %s (no training checkpoint)", config.init.weights)
  return params, frozen_vae_params(models, config, mesh, rules)


def segmenter(models: Models, config: ml_collections.ConfigDict):
  """jit(params, vae_params, images (B, R, R, 3), text, text_mask) -> mask logits (B, R, R)."""

  @jax.jit
  def run(params, vae_params, images, text, text_mask):
    return segment.segment(
      models.velocity,
      params,
      models.encode(vae_params, images),
      text,
      text_mask,
      config=config.segment,
      vae_params=vae_params,
      vae_mask_logits=models.vae_mask_logits,
    )

  return run


def generator(models: Models, config: ml_collections.ConfigDict, resolution: int):
  """jit(params, vae_params, rng, text, text_mask, guidance_scale) -> images (B, R, R, 3)."""
  latent_side = resolution // spatial_stride(config.vae.dim_mult)

  @jax.jit
  def run(params, vae_params, rng: jax.Array, text, text_mask, guidance_scale: Any):
    noise = jax.random.normal(
      rng, (text.shape[0], 1, latent_side, latent_side, config.vae.z_dim), jnp.float32
    )
    latents = generate.generate(
      models.velocity,
      params,
      noise,
      text,
      text_mask,
      guidance_scale,
      num_steps=config.generate.num_steps,
      shift=config.generate.shift,
    )
    return models.decode(vae_params, latents[:, 0])

  return run
