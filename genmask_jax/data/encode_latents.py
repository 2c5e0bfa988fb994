"""Encodes a sample store into a latent store (data/latents.py) with any encoder.

`encode_store` runs an encoder (a function of image batches) over one worker's slice of a
sample store, preprocessing exactly as the training pipeline does. The frozen VAE it is given
comes from the latent-precompute stage (training/precompute_latents.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from genmask_jax.data import latents, preprocess, records
from genmask_jax.data.masks import mask_to_image
from genmask_jax.data.store import StoreError, StoreLayout


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
