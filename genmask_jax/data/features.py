"""The VLM feature store: per-sample encoder hidden states keyed by sample id.

A store is a directory (local or gs://) written by `launch/precompute_vlm.py`:

  meta.json                       the encoder (FeatureMeta) and the shard layout
  features-WWWWW-of-NNNNN-SSSSS.array_record
                                  msgpack records {id, text, dtype, shape, hidden}, one a sample
  features-...-SSSSS.ids.json     the ids of that shard in order (so nothing reads features to list)
  manifest.json                   written once every shard exists: shard files and their ids

Workers own disjoint contiguous slices of the sample store and write shards of `shard_size`
samples; each shard appears whole (fileio: a renamed or uploaded local file), so an interrupted
run resumes by skipping the shards that exist. Records never hold pickles: hidden states are
raw bf16/fp16 bytes plus a shape.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from genmask_jax.runtime import fileio

FORMAT_VERSION = 1
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
STORE_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


class FeatureError(ValueError):
  """A feature store is missing, incomplete, or does not match what the caller expects."""


@dataclasses.dataclass(frozen=True)
class FeatureMeta:
  model_id: str
  prompt_template: str
  dtype: str
  hidden_size: int
  format_version: int = FORMAT_VERSION
  # vlm/image_policy.ImagePolicy.to_record() of the images encoded; None in stores written
  # before it was recorded (they used that module's defaults).
  image_policy: dict | None = None


@dataclasses.dataclass(frozen=True)
class StoreLayout:
  """How the samples are split over workers and shards; fixed for the life of a store."""

  num_samples: int
  num_workers: int
  shard_size: int

  def worker_range(self, worker_index: int) -> tuple[int, int]:
    """The contiguous [start, stop) slice of the sample store that one worker encodes."""
    n, w = self.num_samples, self.num_workers
    return worker_index * n // w, (worker_index + 1) * n // w

  def shard_ranges(self, worker_index: int) -> list[tuple[int, int]]:
    start, stop = self.worker_range(worker_index)
    return [(s, min(s + self.shard_size, stop)) for s in range(start, stop, self.shard_size)]

  def shard_name(self, worker_index: int, shard_index: int) -> str:
    return f"features-{worker_index:05d}-of-{self.num_workers:05d}-{shard_index:05d}"


class FeatureItem(NamedTuple):
  id: str
  text: str  # What was encoded: the target / caption, or the VLM's rewrite in reasoning mode.
  hidden: np.ndarray  # (L, hidden_size), any float dtype; stored as meta.dtype.


def check_meta(meta: FeatureMeta, model_id: str, prompt_template: str) -> None:
  """Raises FeatureError unless the store was encoded by `model_id` with `prompt_template`."""
  if meta.model_id != model_id:
    raise FeatureError(
      f"feature store was encoded by model {meta.model_id!r}, expected {model_id!r}: "
      "re-run launch/precompute_vlm.py with the expected encoder"
    )
  if meta.prompt_template != prompt_template:
    raise FeatureError(
      f"feature store was encoded with prompt template {meta.prompt_template!r}, "
      f"expected {prompt_template!r}: re-run launch/precompute_vlm.py"
    )


def _read_meta(path: str) -> tuple[FeatureMeta, StoreLayout]:
  obj = fileio.read_json(os.path.join(path, META_FILE), FeatureError)
  try:
    meta = FeatureMeta(**obj["meta"])
    layout = StoreLayout(**obj["layout"])
  except (KeyError, TypeError) as e:
    raise FeatureError(f"{path}/{META_FILE}: expected 'meta' and 'layout' objects ({e})") from e
  if meta.format_version != FORMAT_VERSION:
    raise FeatureError(
      f"{path}: feature format version {meta.format_version}, this code reads {FORMAT_VERSION}"
    )
  if meta.dtype not in STORE_DTYPES:
    raise FeatureError(f"{path}: dtype {meta.dtype!r} is not one of {sorted(STORE_DTYPES)}")
  return meta, layout


def encode_record(item: FeatureItem, dtype: str) -> bytes:
  hidden = np.asarray(item.hidden)
  if hidden.ndim != 2:
    raise FeatureError(f"sample {item.id!r}: hidden states must be (L, hidden), got {hidden.shape}")
  data = np.ascontiguousarray(hidden.astype(STORE_DTYPES[dtype]))
  return msgpack.packb(
    {
      "id": item.id,
      "text": item.text,
      "dtype": dtype,
      "shape": list(data.shape),
      "hidden": data.tobytes(),
    }
  )


def decode_record(raw: bytes, where: str) -> FeatureItem:
  """The record's item with float32 hidden states; `where` names the shard in errors."""
  try:
    rec = msgpack.unpackb(raw)
    dtype, shape, buf = STORE_DTYPES[rec["dtype"]], tuple(rec["shape"]), rec["hidden"]
    sample_id, text = rec["id"], rec["text"]
  except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
    raise FeatureError(f"{where}: not a feature record ({e!r})") from e
  if len(shape) != 2 or len(buf) != dtype.itemsize * shape[0] * shape[1]:
    raise FeatureError(f"{where}: sample {sample_id!r} holds {len(buf)} bytes for shape {shape}")
  hidden = np.frombuffer(buf, dtype).reshape(shape).astype(np.float32)
  return FeatureItem(sample_id, text, hidden)


class FeatureWriter:
  """Writes one worker's shards of a store; safe to re-create after an interruption."""

  def __init__(self, path: str, meta: FeatureMeta, layout: StoreLayout, worker_index: int):
    if meta.dtype not in STORE_DTYPES:
      raise FeatureError(f"dtype {meta.dtype!r} is not one of {sorted(STORE_DTYPES)}")
    if not 0 <= worker_index < layout.num_workers:
      raise FeatureError(f"worker index {worker_index} outside [0, {layout.num_workers})")
    self.path, self.meta, self.layout, self.worker_index = path, meta, layout, worker_index
    fileio.makedirs(path)
    if not fileio.exists(os.path.join(path, META_FILE)):
      fileio.write_json(
        os.path.join(path, META_FILE),
        {"meta": dataclasses.asdict(meta), "layout": dataclasses.asdict(layout)},
      )
    self._check_settings()
    self._remove_stale_temp_files()

  def _check_settings(self) -> None:
    old_meta, old_layout = _read_meta(self.path)
    if (old_meta, old_layout) != (self.meta, self.layout):
      raise FeatureError(
        f"{self.path} was started with {old_meta} {old_layout}; this run has {self.meta} "
        f"{self.layout}: resume with the same settings or write to a new directory"
      )

  def _remove_stale_temp_files(self) -> None:
    # Left by a killed run of this worker; other workers' temp files may be live.
    prefix = f"features-{self.worker_index:05d}-of-{self.layout.num_workers:05d}-"
    for name in fileio.listdir(self.path):
      if name.startswith(prefix) and fileio.is_temp_name(name):
        fileio.remove(os.path.join(self.path, name))

  def _shard_path(self, worker_index: int, shard_index: int) -> str:
    return os.path.join(self.path, self.layout.shard_name(worker_index, shard_index))

  def pending_shards(self) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) of this worker's shards not yet written, in order."""
    return [
      (s, start, stop)
      for s, (start, stop) in enumerate(self.layout.shard_ranges(self.worker_index))
      if not fileio.exists(self._shard_path(self.worker_index, s) + ".array_record")
    ]

  def write_shard(self, shard_index: int, items: Sequence[FeatureItem]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    start, stop = self.layout.shard_ranges(self.worker_index)[shard_index]
    if len(items) != stop - start:
      raise FeatureError(
        f"shard {shard_index} of worker {self.worker_index} covers samples [{start}, {stop}), "
        f"got {len(items)} items"
      )
    for item in items:
      if np.ndim(item.hidden) != 2 or item.hidden.shape[1] != self.meta.hidden_size:
        raise FeatureError(
          f"sample {item.id!r}: hidden states {np.shape(item.hidden)}, expected "
          f"(L, {self.meta.hidden_size})"
        )

    def write(tmp: str) -> None:
      writer = ArrayRecordWriter(tmp, "group_size:1")
      for item in items:
        writer.write(encode_record(item, self.meta.dtype))
      writer.close()

    base = self._shard_path(self.worker_index, shard_index)
    # The ids first: a shard counts as written once its .array_record exists.
    fileio.write_json(base + ".ids.json", [item.id for item in items])
    fileio.atomic_write(base + ".array_record", write)

  def finalize(self) -> bool:
    """Writes the manifest once every worker's shards exist; returns whether the store is done."""
    self._check_settings()  # Workers that started at once may have raced on meta.json.
    shards = []
    for w in range(self.layout.num_workers):
      for s in range(len(self.layout.shard_ranges(w))):
        base = self._shard_path(w, s)
        if not fileio.exists(base + ".array_record"):
          return False
        ids = fileio.read_json(base + ".ids.json", FeatureError)
        shards.append({"file": os.path.basename(base) + ".array_record", "ids": ids})
    ids = [i for shard in shards for i in shard["ids"]]
    if len(ids) != self.layout.num_samples or len(set(ids)) != len(ids):
      raise FeatureError(
        f"{self.path}: shards hold {len(ids)} ids ({len(set(ids))} distinct), "
        f"expected {self.layout.num_samples} distinct"
      )
    fileio.write_json(os.path.join(self.path, MANIFEST_FILE), {"shards": shards})
    return True


class FeatureReader:
  """Random access to a finished store by sample id; picklable (shard readers open lazily)."""

  def __init__(self, path: str):
    self.path = path
    self.meta, self.layout = _read_meta(path)
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not fileio.exists(manifest_path):
      raise FeatureError(
        f"{path}: no {MANIFEST_FILE}, the store is incomplete: finish (or resume) "
        "launch/precompute_vlm.py for every worker"
      )
    shards = fileio.read_json(manifest_path, FeatureError)["shards"]
    self._files = [os.path.join(path, shard["file"]) for shard in shards]
    self._ids = [i for shard in shards for i in shard["ids"]]
    self._index = {
      sample_id: (f, pos)
      for f, shard in enumerate(shards)
      for pos, sample_id in enumerate(shard["ids"])
    }
    if len(self._index) != len(self._ids):
      raise FeatureError(f"{manifest_path}: repeated sample ids")
    self._readers = {}

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_readers": {}}

  def __len__(self) -> int:
    return len(self._ids)

  def ids(self) -> list[str]:
    return list(self._ids)

  def _item(self, sample_id: str) -> FeatureItem:
    from array_record.python.array_record_module import ArrayRecordReader

    if sample_id not in self._index:
      raise FeatureError(f"{self.path}: no features for sample id {sample_id!r}")
    f, pos = self._index[sample_id]
    if f not in self._readers:
      # Random single-record reads: no read-ahead.
      self._readers[f] = ArrayRecordReader(self._files[f], "readahead_buffer_size:0")
    where = f"{self._files[f]} record {pos}"
    item = decode_record(self._readers[f].read([pos])[0], where)
    if item.id != sample_id or item.hidden.shape[1] != self.meta.hidden_size:
      raise FeatureError(
        f"{where}: holds sample {item.id!r} shape {item.hidden.shape}, the manifest says "
        f"{sample_id!r} with hidden size {self.meta.hidden_size}"
      )
    return item

  def get(self, sample_id: str) -> np.ndarray:
    """(L_real_tokens, hidden_size) float32 hidden states of one sample."""
    return self._item(sample_id).hidden

  def text(self, sample_id: str) -> str:
    """The text that was encoded (the VLM's rewritten target in reasoning mode)."""
    return self._item(sample_id).text
