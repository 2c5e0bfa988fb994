"""The latent store: a sample store's clean VAE latents, computed once instead of every step.

Training images and masks are only resized and padded, never randomly augmented, so their
latents are the same every epoch; reading them from a store skips the frozen VAE encoder in
the train step (a quarter of the CPU demo's step: benchmarks/demo_step.py). A store belongs to
one sample store (same ids, same order), one task, one resolution and one VAE: its
fingerprint (runs/model.vae_fingerprint) hashes the VAE's settings (latent statistics
included) and parameters, and training refuses a store made by another VAE.

A store of the protocol of data/store.py, kind "latents", written by
`launch/precompute_latents.py` (training/encode_latents.py): store.json holds LatentMeta (VAE
fingerprint, task, resolution, stored dtype) and the layout; a shard is
latents-WWWWW-of-NNNNN-SSSSS.image.npy, (n, h, w, z_dim) normalized latents of the images, and
for segmentation .mask.npy, those of the mask images. Arrays are plain .npy files (never
pickles), written locally, memory-mapped, and published whole. Locally they are read
memory-mapped; on gs:// each row is one ranged read of the object (`RemoteRows`): a per-host
copy would put the whole store on every host's disk (the image and mask latents of 1M samples
at 512x512 are ~0.5 TB in float32), while a training step reads a few rows per sample, in
parallel over grain's threads (benchmarks/data_pipeline.py --gcs). Numpy only: no JAX.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from genmask_jax.data import store, tasks
from genmask_jax.data.store import StoreError, StoreLayout
from genmask_jax.runtime import fileio

KIND = "latents"
STORE_DTYPES = ("float32", "float16")
# Rows a shard: a multiple of the usual batch sizes, so that batches never straddle a shard
# boundary and a shard's latents are those one long run of batches would give.
SHARD_SIZE = 1024
# Example keys of the latents, by what they encode.
KEYS = {"image": "image_latents", "mask": "mask_latents"}
LatentError = StoreError  # The name callers catch a wrong or mismatched latent store by.


@dataclasses.dataclass(frozen=True)
class LatentMeta:
  vae: str  # runs/model.vae_fingerprint of the VAE that encoded the store.
  task: str
  resolution: int
  dtype: str


def latent_sources(data: Mapping) -> list[tuple[str, Mapping]]:
  """(task, source) of every training source of a data config that names a latent store."""
  return [(t, s) for t in tasks.NAMES for s in data[t].sources if s.get("latents")]


def roles(task: str) -> tuple[str, ...]:
  """What a row of a `task` store encodes."""
  return ("image", "mask") if task == "segmentation" else ("image",)


class LatentWriter(store.ShardedWriter):
  """Writes one worker's shards of a store; safe to re-create after an interruption."""

  def __init__(self, path: str, meta: LatentMeta, layout: StoreLayout, worker_index: int):
    if meta.dtype not in STORE_DTYPES:
      raise StoreError(f"{path}: dtype {meta.dtype!r} is not one of {STORE_DTYPES}")
    suffixes = {role: f".{role}.npy" for role in roles(meta.task)}
    super().__init__(path, KIND, meta, layout, worker_index, suffixes)

  def write_shard(
    self, shard_index: int, ids: Sequence[str], batches: Iterable[dict[str, np.ndarray]]
  ) -> None:
    """Writes shard `shard_index` (rows `ids`) from its rows in order, a batch at a time
    ({role: (b, h, w, z_dim)}), into memory-mapped local files: a shard may not fit in RAM."""
    size = len(ids)

    def write(local: dict[str, str]) -> None:
      arrays, row = {}, 0
      for batch in batches:
        n = len(batch["image"])
        for role, rows in batch.items():
          if role not in arrays:
            shape, dtype = (size,) + rows.shape[1:], np.dtype(self.meta.dtype)
            arrays[role] = np.lib.format.open_memmap(local[role], "w+", dtype, shape)
          arrays[role][row : row + n] = rows
        row += n
      if row != size or set(arrays) != set(self.suffixes):
        raise StoreError(f"{self.path}: shard {shard_index} got {row} rows of {sorted(arrays)}")
      for array in arrays.values():
        array.flush()

    self.publish_shard(shard_index, ids, write)


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


class LatentReader(store.StoreReader):
  """Random access to a complete store by row index; picklable (arrays map lazily)."""

  kind, meta_type = KIND, LatentMeta

  def __init__(self, path: str):
    super().__init__(path)
    self._arrays = {}

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_arrays": {}}

  def _array(self, shard: int, role: str) -> np.ndarray | RemoteRows:
    if (shard, role) not in self._arrays:
      path = self.file(shard, role)
      try:
        if fileio.is_remote(path):
          array = RemoteRows(path)
        else:
          array = np.load(path, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise StoreError(f"{path}: not a readable .npy array ({e})") from e
      rows = len(self.shards[shard].ids)
      if array.ndim != 4 or len(array) != rows:
        raise StoreError(f"{path}: shape {array.shape}, expected ({rows}, h, w, z_dim)")
      self._arrays[shard, role] = array
    return self._arrays[shard, role]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """{"image_latents": (h, w, z_dim), "mask_latents": ... (segmentation)} as float32."""
    shard, row = self.locate(index)
    return {
      KEYS[role]: np.asarray(self._array(shard, role)[row], np.float32)
      for role in roles(self.meta.task)
    }


def check_vae(path: str, fingerprint: str) -> None:
  """Raises StoreError unless the store at `path` was encoded by the VAE of `fingerprint`."""
  if store.read_meta(path, KIND, LatentMeta).meta.vae != fingerprint:
    raise StoreError(
      f"{path} was encoded by another VAE (or another VAE config) than this run's: re-run "
      "launch/precompute_latents.py with this config"
    )
