"""The latent store: a sample store's clean VAE latents, computed once instead of every step.

Training images and masks are only resized and padded, never randomly augmented, so their
latents are the same every epoch; reading them from a store skips the frozen VAE encoder in
the train step (a quarter of the CPU demo's step: benchmarks/demo_step.py). A store belongs to
one sample store (same ids, same order), one task, one resolution and one VAE: `vae_fingerprint`
hashes the VAE's settings (latent statistics included) and parameters, and training refuses a
store made by another VAE.

A store is a directory written by `launch/precompute_latents.py`:

  meta.json                    LatentMeta
  ids-WWWWW-of-NNNNN.json      worker W's sample ids in order; written last, it marks the
                               worker's files complete
  image-WWWWW-of-NNNNN.npy     (n, h, w, z_dim) normalized latents of the images
  mask-WWWWW-of-NNNNN.npy      (n, h, w, z_dim) latents of the mask images (segmentation only)

Worker W of N encodes the W-th contiguous slice of the sample store; a re-run skips the workers
whose files exist. Arrays are plain .npy files read memory-mapped (never with pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from genmask_jax.data import records
from genmask_jax.data.features import StoreLayout, read_json, write_json
from genmask_jax.masks import mask_to_image

FORMAT_VERSION = 1
META_FILE = "meta.json"
STORE_DTYPES = ("float32", "float16")
# Example keys of the latents, by what they encode.
KEYS = {"image": "image_latents", "mask": "mask_latents"}


class LatentError(ValueError):
  """A latent store is missing, incomplete, or does not match its samples or the VAE."""


@dataclasses.dataclass(frozen=True)
class LatentMeta:
  vae: str  # vae_fingerprint of the VAE that encoded the store.
  task: str
  resolution: int
  num_samples: int
  num_workers: int
  dtype: str
  format_version: int = FORMAT_VERSION


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


def _file(path: str, name: str, worker: int, num_workers: int, ext: str) -> str:
  return os.path.join(path, f"{name}-{worker:05d}-of-{num_workers:05d}.{ext}")


def _names(task: str) -> tuple[str, ...]:
  return ("image", "mask") if task == "segmentation" else ("image",)


def _read_meta(path: str) -> LatentMeta:
  obj = read_json(os.path.join(path, META_FILE), LatentError)
  try:
    meta = LatentMeta(**obj)
  except TypeError as e:
    raise LatentError(f"{path}/{META_FILE}: not latent store metadata ({e})") from e
  if meta.format_version != FORMAT_VERSION:
    raise LatentError(
      f"{path}: latent format version {meta.format_version}, this code reads {FORMAT_VERSION}"
    )
  return meta


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
  from genmask_jax.data.pipeline import pixels  # The pipeline imports this module.

  if dtype not in STORE_DTYPES:
    raise LatentError(f"dtype {dtype!r} is not one of {STORE_DTYPES}")
  samples = records.RecordReader(records_dir)
  tasks = set(samples.meta["tasks"])
  if len(tasks) != 1:
    raise LatentError(f"{records_dir}: holds {sorted(tasks)} samples, expected one task")
  if not 0 <= worker_index < num_workers <= len(samples):
    raise LatentError(
      f"worker {worker_index} of {num_workers}: expected 0 <= worker < workers <= "
      f"{len(samples)} (the samples of {records_dir})"
    )
  meta = LatentMeta(vae, tasks.pop(), resolution, len(samples), num_workers, dtype)
  os.makedirs(out_dir, exist_ok=True)
  if not os.path.exists(os.path.join(out_dir, META_FILE)):
    write_json(os.path.join(out_dir, META_FILE), dataclasses.asdict(meta))
  started = _read_meta(out_dir)
  if started != meta:
    raise LatentError(
      f"{out_dir} was started with {started}; this run has {meta}: resume with the "
      "same VAE, resolution and workers, or write to a new directory"
    )
  ids_file = _file(out_dir, "ids", worker_index, num_workers, "json")
  if not os.path.exists(ids_file):
    start, stop = StoreLayout(len(samples), num_workers, 1).worker_range(worker_index)
    arrays = {}  # Written row by row into memory-mapped .npy files: a slice may not fit in RAM.
    for b in range(start, stop, batch_size):
      batch = [pixels(samples[i], resolution) for i in range(b, min(b + batch_size, stop))]
      for name in _names(meta.task):
        inputs = np.stack([p[name] for p in batch])
        if name == "mask":
          inputs = np.asarray(mask_to_image(inputs))
        padded = np.zeros((batch_size,) + inputs.shape[1:], inputs.dtype)  # One compiled shape.
        padded[: len(inputs)] = inputs
        rows = np.asarray(encode(padded))[: len(inputs)]
        if name not in arrays:  # Only this worker writes its files, so a fixed temp name.
          path = _file(out_dir, name, worker_index, num_workers, "npy.tmp")
          shape = (stop - start,) + rows.shape[1:]
          arrays[name] = np.lib.format.open_memmap(path, "w+", np.dtype(dtype), shape)
        arrays[name][b - start : b - start + len(rows)] = rows
    for name, array in arrays.items():
      array.flush()
      os.replace(array.filename, _file(out_dir, name, worker_index, num_workers, "npy"))
    write_json(ids_file, samples.ids()[start:stop])
  return all(
    os.path.exists(_file(out_dir, "ids", w, num_workers, "json")) for w in range(num_workers)
  )


class LatentReader:
  """Random access to a complete store by record index; picklable (arrays map lazily)."""

  def __init__(self, path: str):
    self.path = path
    self.meta = _read_meta(path)
    n = self.meta.num_workers
    missing = [w for w in range(n) if not os.path.exists(_file(path, "ids", w, n, "json"))]
    if missing:
      raise LatentError(
        f"{path}: incomplete, workers {missing} of {n} have not written their latents: run "
        "launch/precompute_latents.py for every worker"
      )
    per_worker = [read_json(_file(path, "ids", w, n, "json"), LatentError) for w in range(n)]
    self._ids = [i for ids in per_worker for i in ids]
    if len(self._ids) != self.meta.num_samples:
      raise LatentError(f"{path}: {len(self._ids)} ids, the metadata says {self.meta.num_samples}")
    self._starts = np.cumsum([0] + [len(ids) for ids in per_worker])
    self._arrays = {}

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_arrays": {}}

  def __len__(self) -> int:
    return len(self._ids)

  def ids(self) -> list[str]:
    return list(self._ids)

  def _array(self, name: str, worker: int) -> np.ndarray:
    if (name, worker) not in self._arrays:
      path = _file(self.path, name, worker, self.meta.num_workers, "npy")
      try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise LatentError(f"{path}: not a readable .npy array ({e})") from e
      rows = self._starts[worker + 1] - self._starts[worker]
      if array.ndim != 4 or len(array) != rows:
        raise LatentError(f"{path}: shape {array.shape}, expected ({rows}, h, w, z_dim)")
      self._arrays[name, worker] = array
    return self._arrays[name, worker]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """{"image_latents": (h, w, z_dim), "mask_latents": ... (segmentation)} as float32."""
    worker = int(np.searchsorted(self._starts, index, side="right")) - 1
    row = index - self._starts[worker]
    return {
      KEYS[name]: np.asarray(self._array(name, worker)[row], np.float32)
      for name in _names(self.meta.task)
    }


def check_vae(path: str, fingerprint: str) -> None:
  """Raises LatentError unless the store at `path` was encoded by the VAE of `fingerprint`."""
  if _read_meta(path).vae != fingerprint:
    raise LatentError(
      f"{path} was encoded by another VAE (or another VAE config) than this run's: re-run "
      "launch/precompute_latents.py with this config"
    )
