"""The store protocol: sample records, VLM features and VAE latents are stores of one layout.

A store is a folder (local or gs://) of rows aligned by index: row i of a feature or latent
store belongs to sample i of its sample store, which `check_aligned` checks once, by id, where
the pipeline joins them. Worker w of n writes the w-th contiguous slice of the rows, in shards
of `shard_size` rows (the sample store: one worker):

  store.json                      StoreMeta: kind, format version, layout and the kind's own
                                  metadata (what its rows were computed with); written first
                                  (for a sample store, whose size is known only at the end,
                                  just before its part)
  KIND-WWWWW-of-NNNNN-SSSSS.EXT   a shard's files, one per role of the row format (records:
                                  .array_record; latents: .image.npy and .mask.npy), each
                                  published whole: a reader never sees half a shard
  KIND-WWWWW-of-NNNNN-SSSSS.ids.json
                                  the shard's sample ids, written after its files: the shard
                                  exists once this file does, and a re-run skips it
  part-WWWWW-of-NNNNN.json        worker w's part, written by its `finalize()` once all its
                                  shards exist: {"shards": [{"files": {role: name}, "ids"}]}

A store is complete when store.json and every worker's part exist (`is_complete`); readers
refuse anything else, naming the workers still missing, and a store.json of another format
version or without the metadata this code records, naming the command that rebuilds the store
(WRITTEN_BY). Every file is written through runtime/fileio (atomic, local or gs://).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from genmask_jax.runtime import fileio

FORMAT_VERSION = 2
META_FILE = "store.json"
IDS_SUFFIX = ".ids.json"
WRITTEN_BY = {
  "records": "launch/prepare_data.py",
  "features": "launch/precompute_vlm.py",
  "latents": "launch/precompute_latents.py",
}
# Files of this protocol (an overwrite removes only these).
_STORE_FILE = re.compile(
  r"store\.json|part-\d{5}-of-\d{5}\.json|[a-z]+-\d{5}-of-\d{5}(-\d{5})?(\.\w+)+"
)


class StoreError(ValueError):
  """A store is missing, incomplete, malformed or not the one expected; the message names it."""


@dataclasses.dataclass(frozen=True)
class StoreLayout:
  """How the rows are split over workers and shards; fixed for the life of a store."""

  num_samples: int
  num_workers: int
  shard_size: int

  def worker_range(self, worker_index: int) -> tuple[int, int]:
    """The contiguous [start, stop) slice of the rows that one worker writes."""
    n, w = self.num_samples, self.num_workers
    return worker_index * n // w, (worker_index + 1) * n // w

  def shard_ranges(self, worker_index: int) -> list[tuple[int, int]]:
    start, stop = self.worker_range(worker_index)
    return [(s, min(s + self.shard_size, stop)) for s in range(start, stop, self.shard_size)]


@dataclasses.dataclass(frozen=True)
class StoreMeta:
  """store.json: what a store is; `meta` is its kind's dataclass (RecordMeta, FeatureMeta,
  LatentMeta), and a writer resumes a store only with all of it equal."""

  kind: str
  layout: StoreLayout
  meta: Any
  format_version: int = FORMAT_VERSION


def shard_stem(kind: str, worker_index: int, num_workers: int, shard_index: int) -> str:
  return f"{kind}-{worker_index:05d}-of-{num_workers:05d}-{shard_index:05d}"


def shard_files(stem: str, suffixes: Mapping[str, str]) -> dict[str, str]:
  """A shard's file names by role."""
  return {role: stem + suffix for role, suffix in suffixes.items()}


def part_name(worker_index: int, num_workers: int) -> str:
  return f"part-{worker_index:05d}-of-{num_workers:05d}.json"


def is_store_file(name: str) -> bool:
  """Whether a file name is one a store writes."""
  return bool(_STORE_FILE.fullmatch(name)) or fileio.is_temp_name(name)


def rebuild_hint(kind: str, path: str) -> str:
  """How to write the `kind` store at `path` afresh."""
  command = WRITTEN_BY[kind].removesuffix(".py").replace("/", ".")
  return f"remove {path} and write it again with `python -m {command}`"


def write_meta(path: str, meta: StoreMeta) -> None:
  fileio.write_json(os.path.join(path, META_FILE), dataclasses.asdict(meta), indent=1)


def read_meta(path: str, kind: str, meta_type: type) -> StoreMeta:
  """The StoreMeta of the `kind` store at `path`; StoreError naming what is wrong."""
  meta_path = os.path.join(path, META_FILE)
  if not fileio.exists(meta_path):
    raise StoreError(
      f"{path}: no {META_FILE}: not a {kind} store, or its conversion did not finish"
    )
  obj = fileio.read_json(meta_path, StoreError)
  if obj.get("format_version") != FORMAT_VERSION:
    raise StoreError(
      f"{meta_path}: format version {obj.get('format_version')}, this code reads "
      f"{FORMAT_VERSION}: {rebuild_hint(kind, path)}"
    )
  if obj.get("kind") != kind:
    raise StoreError(f"{path}: a {obj.get('kind')} store, expected {kind}")
  try:
    return StoreMeta(kind, StoreLayout(**obj["layout"]), meta_type(**obj["meta"]))
  except (KeyError, TypeError) as e:
    raise StoreError(
      f"{meta_path}: not the {kind} store metadata this code records ({e}): "
      + rebuild_hint(kind, path)
    ) from e


def missing_workers(path: str, layout: StoreLayout) -> list[int]:
  """The workers whose part of the store at `path` is not written yet."""
  names = set(fileio.listdir(path))
  n = layout.num_workers
  return [w for w in range(n) if part_name(w, n) not in names]


def is_complete(path: str) -> bool:
  """Whether `path` holds a complete store."""
  meta_path = os.path.join(path, META_FILE)
  if not fileio.exists(meta_path):
    return False
  try:
    layout = StoreLayout(**fileio.read_json(meta_path, StoreError)["layout"])
  except (KeyError, TypeError) as e:
    raise StoreError(f"{meta_path}: no valid layout ({e})") from e
  return not missing_workers(path, layout)


def write_part(path: str, layout: StoreLayout, worker_index: int, shards: list[dict]) -> None:
  """Worker `worker_index`'s part: its shards ({"files": {role: name}, "ids": [...]}) in order."""
  name = part_name(worker_index, layout.num_workers)
  fileio.write_json(os.path.join(path, name), {"shards": shards})


def written_rows(path: str, kind: str, layout: StoreLayout) -> int:
  """The rows in the shards that exist (a progress count; one listing of `path`)."""
  names = set(fileio.listdir(path))
  n = layout.num_workers
  return sum(
    stop - start
    for w in range(n)
    for s, (start, stop) in enumerate(layout.shard_ranges(w))
    if shard_stem(kind, w, n, s) + IDS_SUFFIX in names
  )


class StagedShard:
  """One shard's files, written locally (`local[role]`), then published whole, then its ids."""

  def __init__(self, path: str, stem: str, suffixes: Mapping[str, str]):
    self.path, self.stem = path, stem
    self.files = shard_files(stem, suffixes)
    self._staged = {
      role: fileio.StagedFile(os.path.join(path, f)) for role, f in self.files.items()
    }
    self.local = {role: staged.local for role, staged in self._staged.items()}

  def publish(self, ids: Sequence[str]) -> dict:
    """Publishes the files, then the ids that mark the shard written; returns its part entry."""
    for staged in self._staged.values():
      staged.publish()
    fileio.write_json(os.path.join(self.path, self.stem + IDS_SUFFIX), list(ids))
    return {"files": self.files, "ids": list(ids)}

  def discard(self) -> None:
    for staged in self._staged.values():
      staged.discard()


class ShardedWriter:
  """Writes one worker's shards of a store whose layout is fixed up front (features, latents);
  safe to re-create after an interruption: written shards are skipped.

  `suffixes` maps each role of the row format to its file name suffix.
  """

  def __init__(
    self,
    path: str,
    kind: str,
    meta: Any,
    layout: StoreLayout,
    worker_index: int,
    suffixes: Mapping[str, str],
  ):
    if not 0 <= worker_index < layout.num_workers:
      raise StoreError(f"{path}: worker index {worker_index} outside [0, {layout.num_workers})")
    self.path, self.kind, self.meta, self.layout = path, kind, meta, layout
    self.worker_index, self.suffixes = worker_index, dict(suffixes)
    fileio.makedirs(path)
    if not fileio.exists(os.path.join(path, META_FILE)):
      write_meta(path, StoreMeta(kind, layout, meta))
    # A complete store of the same rows is done whatever layout wrote it (another worker
    # count); only an unfinished one must be resumed as it started.
    started = read_meta(path, kind, type(meta))
    same_rows = started.meta == meta and started.layout.num_samples == layout.num_samples
    self._done = same_rows and is_complete(path)
    if not self._done:
      self._check_settings()
      self._remove_stale_temp_files()

  def _check_settings(self) -> None:
    started = read_meta(self.path, self.kind, type(self.meta))
    if started != StoreMeta(self.kind, self.layout, self.meta):
      raise StoreError(
        f"{self.path} was started with {started.meta} {started.layout}; this run has "
        f"{self.meta} {self.layout}: resume with the same settings or write to a new directory"
      )

  def _stem(self, shard_index: int) -> str:
    return shard_stem(self.kind, self.worker_index, self.layout.num_workers, shard_index)

  def _remove_stale_temp_files(self) -> None:
    # Left by a killed run of this worker; other workers' temp files may be live.
    prefix = shard_stem(self.kind, self.worker_index, self.layout.num_workers, 0)[:-5]
    for name in fileio.listdir(self.path):
      if name.startswith(prefix) and fileio.is_temp_name(name):
        fileio.remove(os.path.join(self.path, name))

  def _part_written(self) -> bool:
    return fileio.exists(
      os.path.join(self.path, part_name(self.worker_index, self.layout.num_workers))
    )

  def pending_shards(self) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) of this worker's shards not yet written, in order."""
    if self._done or self._part_written():
      return []
    names = set(fileio.listdir(self.path))
    return [
      (s, start, stop)
      for s, (start, stop) in enumerate(self.layout.shard_ranges(self.worker_index))
      if self._stem(s) + IDS_SUFFIX not in names
    ]

  def publish_shard(
    self, shard_index: int, ids: Sequence[str], write: Callable[[dict[str, str]], None]
  ) -> None:
    """`write({role: local file})` writes the shard's rows `ids`; then they appear whole."""
    start, stop = self.layout.shard_ranges(self.worker_index)[shard_index]
    if len(ids) != stop - start:
      raise StoreError(
        f"{self.path}: shard {shard_index} of worker {self.worker_index} covers samples "
        f"[{start}, {stop}), got {len(ids)} items"
      )
    shard = StagedShard(self.path, self._stem(shard_index), self.suffixes)
    try:
      write(shard.local)
      shard.publish(ids)
    finally:
      shard.discard()

  def finalize(self) -> bool:
    """Writes this worker's part once all its shards exist; returns whether the store is
    complete (every worker's part written)."""
    if self._done:
      return True
    self._check_settings()  # Workers that started at once may have raced on store.json.
    if not self._part_written():
      if self.pending_shards():
        return False
      shards = []
      for s in range(len(self.layout.shard_ranges(self.worker_index))):
        stem = self._stem(s)
        ids = fileio.read_json(os.path.join(self.path, stem + IDS_SUFFIX), StoreError)
        shards.append({"files": shard_files(stem, self.suffixes), "ids": ids})
      write_part(self.path, self.layout, self.worker_index, shards)
    return not missing_workers(self.path, self.layout)


@dataclasses.dataclass(frozen=True)
class Shard:
  files: dict[str, str]  # Role -> file name in the store.
  ids: list[str]


class StoreReader:
  """A complete store: `meta` (the kind's dataclass), `layout`, and where each row is, by index
  or by sample id. Picklable; subclasses open their shard files lazily."""

  kind: str
  meta_type: type

  def __init__(self, path: str):
    self.path = path
    store_meta = read_meta(path, self.kind, self.meta_type)
    self.meta, self.layout = store_meta.meta, store_meta.layout
    missing = missing_workers(path, self.layout)
    if missing:
      raise StoreError(
        f"{path}: incomplete, workers {missing} of {self.layout.num_workers} have not "
        f"finished: run (or resume) {WRITTEN_BY[self.kind]} for every worker"
      )
    self.shards = [
      Shard(**entry)
      for w in range(self.layout.num_workers)
      for entry in fileio.read_json(
        os.path.join(path, part_name(w, self.layout.num_workers)), StoreError
      )["shards"]
    ]
    self._ids = [i for shard in self.shards for i in shard.ids]
    if len(self._ids) != self.layout.num_samples:
      raise StoreError(f"{path}: {len(self._ids)} ids, the layout says {self.layout.num_samples}")
    self._starts = np.cumsum([0] + [len(shard.ids) for shard in self.shards])
    self._by_id: dict[str, int] | None = None

  def __len__(self) -> int:
    return len(self._ids)

  def ids(self) -> list[str]:
    """The sample ids in row order."""
    return self._ids

  def index_of(self, sample_id: str) -> int:
    if self._by_id is None:
      self._by_id = {sample_id: i for i, sample_id in enumerate(self._ids)}
      if len(self._by_id) != len(self._ids):
        raise StoreError(f"{self.path}: repeated sample ids")
    if sample_id not in self._by_id:
      raise StoreError(f"{self.path}: no sample with id {sample_id!r}")
    return self._by_id[sample_id]

  def locate(self, index: int) -> tuple[int, int]:
    """(shard, row within it) of row `index`."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: index {index} outside [0, {len(self)})")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return shard, index - int(self._starts[shard])

  def file(self, shard: int, role: str) -> str:
    return os.path.join(self.path, self.shards[shard].files[role])


class ArrayRecordReader(StoreReader):
  """A store whose shards are ArrayRecord files of one record a row (role `role`)."""

  role: str

  def __init__(self, path: str):
    super().__init__(path)
    self._readers: dict[int, Any] = {}
    self._lock = threading.Lock()  # grain reads from several threads.

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_readers": {}, "_lock": None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def raw(self, index: int) -> tuple[bytes, str]:
    """Row `index`'s record and where it is ("FILE record R") for error messages."""
    from array_record.python import array_record_module

    shard, row = self.locate(index)
    path = self.file(shard, self.role)
    with self._lock:
      if shard not in self._readers:  # Random single-record reads: no read-ahead.
        self._readers[shard] = array_record_module.ArrayRecordReader(
          path, "readahead_buffer_size:0"
        )
      reader = self._readers[shard]
    where = f"{path} record {row}"
    try:
      return reader.read([row])[0], where
    except Exception as e:  # Riegeli reports corruption as RuntimeError; name the record.
      raise StoreError(f"{where}: unreadable ({e})") from e


def check_aligned(rows: StoreReader, samples: StoreReader) -> None:
  """Raises StoreError naming `rows`' path and the first index where its ids are not those of
  the sample store `samples`, in order."""
  want, got = samples.ids(), rows.ids()
  if got == want:
    return
  i = next(
    (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
  )
  if i == len(want):
    problem = f"{len(got)} rows for the {len(want)} samples of {samples.path}"
  else:
    held = f"row {i} holds {got[i]!r}" if i < len(got) else f"it ends at row {i}"
    problem = f"no {rows.kind} for sample {want[i]!r} (index {i}) of {samples.path} ({held})"
  raise StoreError(
    f"{rows.path}: {problem}: its ids are not those of {samples.path} in order; re-run "
    f"{WRITTEN_BY[rows.kind]} for this sample store"
  )
