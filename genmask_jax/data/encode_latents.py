"""Encodes sample stores into latent stores (data/latents.py) with a frozen VAE.

`encode_store` runs any encoder over one worker's slice of a sample store; `precompute` does so
for every source of a training config's data.segmentation and data.generation that names a
"latents" directory, with the config's VAE, at its task's resolution. Used by
launch/precompute_latents.py and the demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from genmask_jax.data import latents, preprocess, records
from genmask_jax.data.masks import mask_to_image
from genmask_jax.data.store import StoreError, StoreLayout
from genmask_jax.models.genmask import Models, frozen_vae_params
from genmask_jax.runtime import sharding


def vae_fingerprint(vae: Any, vae_params: Any) -> str:
  """A hash of the VAE module's settings (architecture, dtype, latent statistics) and of its
  parameters; the same on every process of a multi-host job."""
  fields = [f.name for f in dataclasses.fields(vae) if f.name not in ("parent", "name")]
  settings = {name: getattr(vae, name) for name in fields}
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(vae_params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _encoded_batches(
  encode: Callable[[np.ndarray], np.ndarray],
  samples: records.RecordReader,
  start: int,
  stop: int,
  *,
  roles: tuple[str, ...],
  resolution: int,
  batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
  """{role: latents} of samples [start, stop), `batch_size` at a time."""
  for b in range(start, stop, batch_size):
    batch = [preprocess.pixels(samples[i], resolution) for i in range(b, min(b + batch_size, stop))]
    encoded = {}
    for role in roles:
      inputs = np.stack([p[role] for p in batch])
      if role == "mask":
        inputs = np.asarray(mask_to_image(inputs))
      padded = np.zeros((batch_size,) + inputs.shape[1:], inputs.dtype)  # One compiled shape.
      padded[: len(inputs)] = inputs
      encoded[role] = np.asarray(encode(padded))[: len(inputs)]
    yield encoded


def encode_store(
  encode: Callable[[np.ndarray], np.ndarray],
  records_dir: str,
  out_dir: str,
  *,
  vae: str,
  resolution: int,
  worker_index: int = 0,
  num_workers: int = 1,
  batch_size: int = 32,
  dtype: str = "float32",
) -> bool:
  """Writes worker `worker_index`'s share of the store; returns whether the store is complete.

  `encode` maps (B, R, R, 3) images in [-1, 1] to (B, h, w, z_dim) normalized latents (the
  frozen VAE whose fingerprint is `vae`); images and masks are resized and padded exactly as the
  training pipeline does.
  """
  samples = records.RecordReader(records_dir)
  tasks = set(samples.meta.tasks)
  if len(tasks) != 1:
    raise StoreError(f"{records_dir}: holds {sorted(tasks)} samples, expected one task")
  if not 0 <= worker_index < num_workers <= len(samples):
    raise StoreError(
      f"worker {worker_index} of {num_workers}: expected 0 <= worker < workers <= "
      f"{len(samples)} (the samples of {records_dir})"
    )
  meta = latents.LatentMeta(vae, tasks.pop(), resolution, dtype)
  layout = StoreLayout(len(samples), num_workers, latents.SHARD_SIZE)
  writer = latents.LatentWriter(out_dir, meta, layout, worker_index)
  ids = samples.ids()
  for shard, start, stop in writer.pending_shards():
    batches = _encoded_batches(
      encode,
      samples,
      start,
      stop,
      roles=latents.roles(meta.task),
      resolution=resolution,
      batch_size=batch_size,
    )
    writer.write_shard(shard, ids[start:stop], batches)
  return writer.finalize()


def precompute(
  config: ml_collections.ConfigDict,
  worker_index: int = 0,
  num_workers: int = 1,
  batch_size: int = 32,
  dtype: str = "float32",
) -> None:
  """Encodes this worker's slice of every training source that names a latent store."""
  todo = [(t, s) for t in records.TASKS for s in config.data[t].sources if s.get("latents")]
  if not todo:
    raise ValueError("config: no source of data.segmentation or data.generation names latents")
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    vae_params = frozen_vae_params(models, config, mesh, rules)
    fingerprint = vae_fingerprint(models.vae, vae_params)
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
