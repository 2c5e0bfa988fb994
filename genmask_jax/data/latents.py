"""The latent store: a sample store's clean VAE latents, computed once instead of every step.

Training images and masks are only resized and padded, never randomly augmented, so their
latents are the same every epoch; reading them from a store skips the frozen VAE encoder in
the train step (a quarter of the CPU demo's step: benchmarks/demo_step.py). A store belongs to
one sample store (same ids, same order), one task, one resolution and one VAE: `vae_fingerprint`
hashes the VAE's settings (latent statistics included) and parameters, and training refuses a
store made by another VAE.

A store is a directory (local or gs://) written by `launch/precompute_latents.py`:

  meta.json                    LatentMeta
  ids-WWWWW-of-NNNNN.json      worker W's sample ids in order; written last, it marks the
                               worker's files complete
  image-WWWWW-of-NNNNN.npy     (n, h, w, z_dim) normalized latents of the images
  mask-WWWWW-of-NNNNN.npy      (n, h, w, z_dim) latents of the mask images (segmentation only)

Worker W of N encodes the W-th contiguous slice of the sample store; a re-run skips the workers
whose files exist. Arrays are plain .npy files (never pickles), written locally and published
whole. Locally they are read memory-mapped; on gs:// each row is one ranged read of the object
(`RemoteRows`): a per-host copy would put the whole store on every host's disk (the image and
mask latents of 1M samples at 512x512 are ~0.5 TB in float32), while a training step reads a
few rows per sample, in parallel over grain's threads (benchmarks/data_pipeline.py --gcs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from genmask_jax.data import records
from genmask_jax.data.features import StoreLayout
from genmask_jax.data.masks import mask_to_image
from genmask_jax.runtime import fileio

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
  obj = fileio.read_json(os.path.join(path, META_FILE), LatentError)
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
  fileio.makedirs(out_dir)
  if not fileio.exists(os.path.join(out_dir, META_FILE)):
    fileio.write_json(os.path.join(out_dir, META_FILE), dataclasses.asdict(meta))
  started = _read_meta(out_dir)
  if started != meta:
    raise LatentError(
      f"{out_dir} was started with {started}; this run has {meta}: resume with the "
      "same VAE, resolution and workers, or write to a new directory"
    )
  ids_file = _file(out_dir, "ids", worker_index, num_workers, "json")
  if not fileio.exists(ids_file):
    start, stop = StoreLayout(len(samples), num_workers, 1).worker_range(worker_index)
    # Written row by row into memory-mapped local .npy files (a slice may not fit in RAM), then
    # published whole.
    staged, arrays = {}, {}
    for b in range(start, stop, batch_size):
      batch = [pixels(samples[i], resolution) for i in range(b, min(b + batch_size, stop))]
      for name in _names(meta.task):
        inputs = np.stack([p[name] for p in batch])
        if name == "mask":
          inputs = np.asarray(mask_to_image(inputs))
        padded = np.zeros((batch_size,) + inputs.shape[1:], inputs.dtype)  # One compiled shape.
        padded[: len(inputs)] = inputs
        rows = np.asarray(encode(padded))[: len(inputs)]
        if name not in arrays:
          staged[name] = fileio.StagedFile(_file(out_dir, name, worker_index, num_workers, "npy"))
          shape = (stop - start,) + rows.shape[1:]
          arrays[name] = np.lib.format.open_memmap(staged[name].local, "w+", np.dtype(dtype), shape)
        arrays[name][b - start : b - start + len(rows)] = rows
    for name, array in arrays.items():
      array.flush()
      staged[name].publish()
    fileio.write_json(ids_file, samples.ids()[start:stop])
  return all(
    fileio.exists(_file(out_dir, "ids", w, num_workers, "json")) for w in range(num_workers)
  )


class RemoteRows:
  """The rows of a .npy file on object storage, each read with one ranged request."""

  def __init__(self, path: str):
    self.path = path
    head = io.BytesIO(fileio.read_range(path, 0, 4096))  # The header fits (npy pads to 64 B).
    version = np.lib.format.read_magic(head)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
      version, np.lib.format.read_array_header_2_0
    )
    self.shape, fortran_order, self.dtype = read_header(head)
    if fortran_order or self.dtype.hasobject:
      raise ValueError(f"{path}: expected a C-ordered numeric array")
    self._offset = head.tell()
    self._row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, row: int) -> np.ndarray:
    data = fileio.read_range(self.path, self._offset + int(row) * self._row_bytes, self._row_bytes)
    return np.frombuffer(data, self.dtype).reshape(self.shape[1:])


class LatentReader:
  """Random access to a complete store by record index; picklable (arrays map lazily)."""

  def __init__(self, path: str):
    self.path = path
    self.meta = _read_meta(path)
    n = self.meta.num_workers
    missing = [w for w in range(n) if not fileio.exists(_file(path, "ids", w, n, "json"))]
    if missing:
      raise LatentError(
        f"{path}: incomplete, workers {missing} of {n} have not written their latents: run "
        "launch/precompute_latents.py for every worker"
      )
    per_worker = [fileio.read_json(_file(path, "ids", w, n, "json"), LatentError) for w in range(n)]
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
        if fileio.is_remote(path):
          array = RemoteRows(path)
        else:
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
