"""The latent-precompute stage: a training config's latent stores, encoded with its frozen VAE.

Every source of data.segmentation and data.generation that names a "latents" directory is
encoded there (data/encode_latents.py) at its task's resolution, by the VAE the config freezes
(runs/model.py), whose fingerprint the store records. Used by launch/precompute_latents.py and
the demo.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from genmask_jax.data import latents
from genmask_jax.data.encode_latents import encode_store
from genmask_jax.models.genmask import Models
from genmask_jax.runs import model
from genmask_jax.runtime import sharding


def precompute(
  config: ml_collections.ConfigDict,
  worker_index: int = 0,
  num_workers: int = 1,
  batch_size: int = 32,
  dtype: str = "float32",
) -> None:
  """Encodes this worker's slice of every training source that names a latent store."""
  todo = latents.latent_sources(config.data)
  if not todo:
    raise ValueError("config: no source of data.segmentation or data.generation names latents")
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    vae_params = model.frozen_vae_params(models, config, mesh, rules)
    fingerprint = model.vae_fingerprint(models.vae, vae_params)
    encode = jax.jit(models.encode)
    for task, source in todo:
      done = encode_store(
        lambda images: encode(vae_params, images)[:, 0],
        source["records"],
        source["latents"],
        vae=fingerprint,
        resolution=config.data[task].resolution,
        worker_index=worker_index,
        num_workers=num_workers,
        batch_size=batch_size,
        dtype=dtype,
      )
      state = "complete" if done else "this worker's slice written"
      logging.info("%s: %s latents %s", source["latents"], task, state)
