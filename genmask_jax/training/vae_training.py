"""Training a WAN-layout VAE from scratch by reconstruction (for the demo: no pretrained
weights can be downloaded there), and the per-channel latent statistics WAN normalizes with."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from genmask_jax.data import preprocess, records
from genmask_jax.data.masks import mask_to_image
from genmask_jax.models.vae import WanVAE, spatial_stride
from genmask_jax.runtime.sharding import strip_axis_names


def unnormalized(vae: WanVAE) -> WanVAE:
  """The same VAE with identity latent normalization (raw posterior means)."""
  return vae.clone(latents_mean=(0.0,) * vae.z_dim, latents_std=(1.0,) * vae.z_dim)


def train_vae(
  vae: WanVAE,
  images: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  lr: float,
  seed: int,
  crop: int | None = None,
  log_every: int = 50,
) -> tuple[Any, list[float]]:
  """Fits `vae` to reconstruct `images` (N, H, W, 3) in [-1, 1] under MSE; returns its
  parameters and the loss of every step.

  With `crop`, each step sees random crop x crop windows at multiples of the VAE's stride (it
  is convolutional, so it then runs on whole images), which is cheaper per step.
  """
  vae, stride = unnormalized(vae), spatial_stride(vae.dim_mult)
  rng = np.random.default_rng(seed)
  params = strip_axis_names(vae.init(jax.random.key(seed), jnp.asarray(images[:1]))["params"])
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.05), weight_decay=0.0)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return jnp.mean(jnp.square(vae.apply({"params": p}, batch) - batch))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []  # Device scalars, read every log_every steps: the loop runs ahead of the device.
  for i in range(steps):
    batch = images[rng.integers(0, len(images), batch_size)]
    if crop:
      y, x = stride * rng.integers(0, (np.array(batch.shape[1:3]) - crop) // stride + 1)
      batch = batch[:, y : y + crop, x : x + crop]
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(loss)
    if (i + 1) % log_every == 0:
      logging.info(
        "VAE step %d/%d: reconstruction MSE %.4f", i + 1, steps, np.mean(losses[-log_every:])
      )
  return params, [float(x) for x in jax.device_get(losses)]


def latent_statistics(
  vae: WanVAE, params: Any, images: np.ndarray, batch_size: int = 64
) -> tuple[list[float], list[float]]:
  """Per-channel mean and std of the raw posterior means over `images`."""
  encode = jax.jit(lambda x: unnormalized(vae).apply({"params": params}, x, method=WanVAE.encode))
  latents = np.concatenate(
    [np.asarray(encode(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
  )
  flat = latents.reshape(-1, latents.shape[-1])
  return flat.mean(0).tolist(), flat.std(0).tolist()


def training_images(records_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and masks of a segmentation store as [-1, 1] arrays (N, H, W, 3)."""
  reader = records.RecordReader(records_dir)
  images = np.stack([records.decode_image(reader[i]) for i in range(len(reader))])
  masks = np.stack([records.decode_mask(reader[i]) for i in range(len(reader))])
  return images.astype(np.float32) / 127.5 - 1, np.asarray(mask_to_image(masks))


def round_trip(vae: WanVAE, vae_params: Any, images: np.ndarray) -> np.ndarray:
  """uint8 images encoded and decoded by the VAE: the best a generated image can be."""
  apply = lambda x, method: vae.apply({"params": vae_params}, x, method=method)
  decoded = jax.jit(lambda x: apply(apply(x, WanVAE.encode), WanVAE.decode))(
    images.astype(np.float32) / 127.5 - 1
  )
  return preprocess.to_uint8(decoded)
