"""Encodes a training config's sample stores into latent stores with its frozen VAE.

Every source of data.segmentation and data.generation that names a "latents" directory is
encoded there at its task's resolution (data/latents.py). Used by launch/precompute_latents.py
and the demo.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from genmask_jax.data import latents
from genmask_jax.data.records import TASKS
from genmask_jax.models.genmask import Models, frozen_vae_params
from genmask_jax.runtime import sharding


def precompute(
  config: ml_collections.ConfigDict,
  worker_index: int = 0,
  num_workers: int = 1,
  batch_size: int = 32,
  dtype: str = "float32",
) -> None:
  """Encodes this worker's slice of every training source that names a latent store."""
  todo = [(t, s) for t in TASKS for s in config.data[t].sources if s.get("latents")]
  if not todo:
    raise ValueError("config: no source of data.segmentation or data.generation names latents")
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    vae_params = frozen_vae_params(models, config, mesh, rules)
    fingerprint = latents.vae_fingerprint(models.vae, vae_params)
    encode = jax.jit(models.encode)
    for task, source in todo:
      done = latents.encode_store(
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
