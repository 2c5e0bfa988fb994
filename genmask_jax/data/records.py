"""The sample store: ArrayRecord shards of msgpack records, one record per sample.

A store is one split of one data set, a directory (local or gs://; shards are written locally
and appear whole, renamed or uploaded, when complete):

  records-00000.array_record ...  one msgpack map per record (below), `shard_size` per shard
  ids.json                        the sample ids in record order (random access by id)
  meta.json                       {"format_version", "num_records", "shards": [{"file",
                                  "num_records"}], "tasks": {task: count}, "info": {...}};
                                  written last: a store without it is incomplete

A record (msgpack map, string keys; never a pickle):

  format_version  int, FORMAT_VERSION
  id              str, unique in the store; the key of the VLM feature store
  task            "segmentation" | "generation"
  image           bytes, the encoded image as stored by the source (JPEG or PNG)
  image_format    "jpeg" | "png"
  height, width   int, the image size (as encoded, EXIF orientation ignored)
  mask            bytes | None: segmentation only, an 8-bit grey PNG of height x width with
                  values {0 background, 1 target, 255 ignore}
  text            str: referring expression, class name, reasoning query or caption
  source          map: where the sample comes from (dataset, split, image id, ref id, ...)

Decoded images are RGB uint8 (H, W, 3) and masks uint8 (H, W), at the original resolution.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import msgpack
import numpy as np
from PIL import Image

from genmask_jax.runtime import fileio

FORMAT_VERSION = 1
TASKS = ("segmentation", "generation")
META_FILE = "meta.json"
IDS_FILE = "ids.json"
MASK_VALUES = (0, 1, 255)
_SHARD_RE = re.compile(r"records-\d{5}\.array_record")
_FIELDS = {
  "format_version": int,
  "id": str,
  "task": str,
  "image": bytes,
  "image_format": str,
  "height": int,
  "width": int,
  "text": str,
  "source": dict,
}

Sample = dict[str, Any]


class RecordError(ValueError):
  """A sample store or one of its records is missing, corrupt or malformed."""


def image_format(data: bytes) -> str:
  """'jpeg' or 'png' from the magic bytes; RecordError for anything else."""
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  raise RecordError(f"image bytes are neither JPEG nor PNG (start {data[:8]!r})")


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of encoded JPEG/PNG bytes, from the header alone."""
  image_format(data)
  width, height = Image.open(io.BytesIO(data)).size
  return height, width


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG of a uint8 (H, W) or RGB (H, W, 3) array."""
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise RecordError(
      f"expected a uint8 (H, W) or (H, W, 3) array, got {array.dtype} {array.shape}"
    )
  if array.ndim == 3:
    array = array[..., ::-1]  # cv2 writes BGR.
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
  if not ok:
    raise RecordError(f"could not encode a {array.shape} array as PNG")
  return buf.tobytes()


def make_sample(
  *,
  sample_id: str,
  task: str,
  image: bytes | np.ndarray,
  text: str,
  source: Mapping[str, Any],
  mask: np.ndarray | None = None,
) -> Sample:
  """A validated record. `image`: JPEG/PNG bytes kept as they are, or an RGB uint8 array
  (stored as PNG). `mask`: (H, W) with values in {0, 1, 255}, required for segmentation."""
  where = f"sample {sample_id!r}"
  if task not in TASKS:
    raise RecordError(f"{where}: task {task!r} is not one of {TASKS}")
  if isinstance(image, np.ndarray):
    image = encode_png(image)
  try:
    fmt = image_format(image)
    height, width = image_size(image)
  except (RecordError, OSError) as e:
    raise RecordError(f"{where}: unreadable image ({e})") from e
  encoded_mask = None
  if task == "segmentation":
    if mask is None:
      raise RecordError(f"{where}: a segmentation sample needs a mask")
    mask = np.asarray(mask)
    if mask.shape != (height, width):
      raise RecordError(f"{where}: mask shape {mask.shape}, image is {(height, width)}")
    bad = np.setdiff1d(np.unique(mask), MASK_VALUES)
    if bad.size:
      raise RecordError(f"{where}: mask values {bad.tolist()} outside {MASK_VALUES}")
    encoded_mask = encode_png(mask.astype(np.uint8))
  elif mask is not None:
    raise RecordError(f"{where}: a generation sample has no mask")
  return {
    "format_version": FORMAT_VERSION,
    "id": sample_id,
    "task": task,
    "image": image,
    "image_format": fmt,
    "height": height,
    "width": width,
    "mask": encoded_mask,
    "text": text,
    "source": dict(source),
  }


def encode_sample(sample: Sample) -> bytes:
  return msgpack.packb(sample, use_bin_type=True)


def decode_sample(raw: bytes, where: str) -> Sample:
  """The record in `raw`; RecordError naming `where` (shard and index) if it is malformed."""
  try:
    sample = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise RecordError(f"{where}: not a msgpack record ({e!r})") from e
  if not isinstance(sample, dict):
    raise RecordError(f"{where}: expected a msgpack map, got {type(sample).__name__}")
  for key, kind in _FIELDS.items():
    if not isinstance(sample.get(key), kind):
      raise RecordError(f"{where}: field {key!r} missing or not {kind.__name__}")
  if sample["format_version"] != FORMAT_VERSION:
    raise RecordError(
      f"{where}: format version {sample['format_version']}, this code reads {FORMAT_VERSION}"
    )
  if sample["task"] not in TASKS:
    raise RecordError(f"{where}: task {sample['task']!r} is not one of {TASKS}")
  if (sample["task"] == "segmentation") != isinstance(sample.get("mask"), bytes):
    raise RecordError(f"{where}: task {sample['task']!r} with mask {type(sample.get('mask'))}")
  return sample


def decode_image(sample: Sample) -> np.ndarray:
  """RGB uint8 (H, W, 3); RecordError naming the sample if the bytes do not decode."""
  flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # Masks index the stored pixels.
  image = cv2.imdecode(np.frombuffer(sample["image"], np.uint8), flags)
  if image is None or image.shape[:2] != (sample["height"], sample["width"]):
    got = None if image is None else image.shape
    raise RecordError(
      f"sample {sample['id']!r}: image does not decode to "
      f"{(sample['height'], sample['width'])} ({sample['image_format']}, decoded {got})"
    )
  return image[..., ::-1]


def decode_mask(sample: Sample) -> np.ndarray:
  """uint8 (H, W) with values {0, 1, 255}."""
  mask = cv2.imdecode(np.frombuffer(sample["mask"], np.uint8), cv2.IMREAD_UNCHANGED)
  if mask is None or mask.shape != (sample["height"], sample["width"]):
    raise RecordError(
      f"sample {sample['id']!r}: mask does not decode to {(sample['height'], sample['width'])}"
    )
  return mask


def _shard_name(index: int) -> str:
  return f"records-{index:05d}.array_record"


class RecordWriter:
  """Writes a store shard by shard; `close()` (or leaving the `with` block) finishes it.

  Refuses a directory that already holds a store unless `overwrite`; even then it only
  removes its own files and refuses a directory holding anything else.
  """

  def __init__(self, path: str, shard_size: int, *, overwrite: bool = False, info=None):
    if shard_size < 1:
      raise ValueError(f"shard_size must be positive, got {shard_size}")
    names = fileio.listdir(path)
    if names:
      ours = [
        n
        for n in names
        if n in (META_FILE, IDS_FILE) or _SHARD_RE.fullmatch(n) or fileio.is_temp_name(n)
      ]
      if not overwrite:
        raise FileExistsError(f"{path} is not empty; pass --overwrite to replace it")
      if len(ours) != len(names):
        raise FileExistsError(
          f"{path} holds files that are not a sample store: {sorted(set(names) - set(ours))}"
        )
      for name in ours:
        fileio.remove(os.path.join(path, name))
    fileio.makedirs(path)
    self.path, self.shard_size, self.info = path, shard_size, dict(info or {})
    self._ids: list[str] = []
    self._seen: set[str] = set()
    self._shards: list[dict] = []
    self._tasks: dict[str, int] = {}
    self._writer = self._staged = None

  def write(self, sample: Sample) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    if sample["id"] in self._seen:
      raise RecordError(f"{self.path}: sample id {sample['id']!r} written twice")
    if self._writer is None or self._shards[-1]["num_records"] == self.shard_size:
      self._close_shard()
      name = _shard_name(len(self._shards))
      # Images are already compressed; one record per chunk keeps random reads cheap.
      self._staged = fileio.StagedFile(os.path.join(self.path, name))
      self._writer = ArrayRecordWriter(self._staged.local, "group_size:1,uncompressed")
      self._shards.append({"file": name, "num_records": 0})
    self._writer.write(encode_sample(sample))
    self._shards[-1]["num_records"] += 1
    self._ids.append(sample["id"])
    self._seen.add(sample["id"])
    self._tasks[sample["task"]] = self._tasks.get(sample["task"], 0) + 1

  def _close_shard(self, publish: bool = True) -> None:
    if self._writer is not None:
      self._writer.close()
      self._staged.publish() if publish else self._staged.discard()
      self._writer = self._staged = None

  def close(self) -> dict:
    """Finishes the store and returns its meta."""
    self._close_shard()
    meta = {
      "format_version": FORMAT_VERSION,
      "num_records": len(self._ids),
      "shards": self._shards,
      "tasks": self._tasks,
      "info": self.info,
    }
    fileio.write_json(os.path.join(self.path, IDS_FILE), self._ids)
    fileio.write_json(os.path.join(self.path, META_FILE), meta, indent=1)  # Last: complete.
    return meta

  def __enter__(self) -> RecordWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self._close_shard(publish=False)  # No meta.json: the store stays marked incomplete.


class RecordReader:
  """Random access to a store by index and by id; picklable (shards open lazily)."""

  def __init__(self, path: str):
    self.path = path
    meta_path = os.path.join(path, META_FILE)
    if not fileio.exists(meta_path):
      raise RecordError(
        f"{path}: no {META_FILE}: not a sample store, or its conversion did not finish"
      )
    self.meta = fileio.read_json(meta_path, RecordError)
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise RecordError(
        f"{meta_path}: format version {self.meta.get('format_version')}, "
        f"this code reads {FORMAT_VERSION}"
      )
    counts = [s["num_records"] for s in self.meta["shards"]]
    self._starts = np.cumsum([0] + counts)
    self._ids: list[str] | None = None
    self._by_id: dict[str, int] | None = None
    self._readers: dict[int, Any] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_readers": {}, "_lock": None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def __len__(self) -> int:
    return int(self._starts[-1])

  def ids(self) -> list[str]:
    if self._ids is None:
      self._ids = fileio.read_json(os.path.join(self.path, IDS_FILE), RecordError)
      if len(self._ids) != len(self):
        raise RecordError(f"{self.path}: {IDS_FILE} lists {len(self._ids)} ids for {len(self)}")
    return self._ids

  def index_of(self, sample_id: str) -> int:
    if self._by_id is None:
      self._by_id = {sample_id: i for i, sample_id in enumerate(self.ids())}
    if sample_id not in self._by_id:
      raise RecordError(f"{self.path}: no sample with id {sample_id!r}")
    return self._by_id[sample_id]

  def _reader(self, shard: int):
    from array_record.python.array_record_module import ArrayRecordReader

    with self._lock:
      if shard not in self._readers:
        path = os.path.join(self.path, self.meta["shards"][shard]["file"])
        self._readers[shard] = ArrayRecordReader(path, "readahead_buffer_size:0")
      return self._readers[shard]

  def __getitem__(self, index: int) -> Sample:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: index {index} outside [0, {len(self)})")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    local = index - int(self._starts[shard])
    where = f"{os.path.join(self.path, self.meta['shards'][shard]['file'])} record {local}"
    try:
      raw = self._reader(shard).read([local])[0]
    except Exception as e:  # Riegeli reports corruption as RuntimeError; name the record.
      raise RecordError(f"{where}: unreadable ({e})") from e
    return decode_sample(raw, where)

  def get(self, sample_id: str) -> Sample:
    sample = self[self.index_of(sample_id)]
    if sample["id"] != sample_id:
      raise RecordError(f"{self.path}: {IDS_FILE} places {sample_id!r} where {sample['id']!r} is")
    return sample

  def __iter__(self) -> Iterator[Sample]:
    for i in range(len(self)):
      yield self[i]
