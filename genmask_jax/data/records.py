"""The sample store: one msgpack record a sample, in ArrayRecord shards (data/store.py).

A store is one split of one data set, a folder (local or gs://) in the store protocol of
data/store.py, kind "records", written by one writer whose number of samples is known only at
the end: its store.json (RecordMeta: the samples per task and the converter's `info`) and its
part are written by `close()`, so a conversion that fails midway leaves a store that reads as
unfinished. Shards: records-00000-of-00001-SSSSS.array_record, `shard_size` records each.

A record (msgpack map, string keys; never a pickle):

  format_version  int, FORMAT_VERSION
  id              str, unique in the store
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

import dataclasses
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cv2
import msgpack
import numpy as np
from PIL import Image

from genmask_jax.data import masks, store, tasks
from genmask_jax.data.store import StoreError
from genmask_jax.runtime import fileio

KIND = "records"
FORMAT_VERSION = 1  # Of a record (the store's own version is store.FORMAT_VERSION).
SUFFIXES = {"records": ".array_record"}
MASK_VALUES = (0, 1, 255)
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
ImageLike = str | np.ndarray | Image.Image  # A JPEG / PNG file, an (H, W, 3) uint8 array, PIL.
RecordError = StoreError  # The name callers and sources raise a bad sample or input file by.


@dataclasses.dataclass(frozen=True)
class RecordMeta:
  tasks: dict[str, int]  # Samples per task.
  info: dict  # What the converter was run with (launch/prepare_data.py's arguments).


def image_format(data: bytes) -> str:
  """'jpeg' or 'png' from the magic bytes; StoreError for anything else."""
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  raise StoreError(f"image bytes are neither JPEG nor PNG (start {data[:8]!r})")


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of encoded JPEG/PNG bytes, from the header alone."""
  image_format(data)
  width, height = Image.open(io.BytesIO(data)).size
  return height, width


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG of a uint8 (H, W) or RGB (H, W, 3) array."""
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise StoreError(f"expected a uint8 (H, W) or (H, W, 3) array, got {array.dtype} {array.shape}")
  if array.ndim == 3:
    array = array[..., ::-1]  # cv2 writes BGR.
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
  if not ok:
    raise StoreError(f"could not encode a {array.shape} array as PNG")
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
  if task not in tasks.NAMES:
    raise StoreError(f"{where}: task {task!r} is not one of {tasks.NAMES}")
  if isinstance(image, np.ndarray):
    image = encode_png(image)
  try:
    fmt = image_format(image)
    height, width = image_size(image)
  except (StoreError, OSError) as e:
    raise StoreError(f"{where}: unreadable image ({e})") from e
  encoded_mask = None
  if task == "segmentation":
    if mask is None:
      raise StoreError(f"{where}: a segmentation sample needs a mask")
    mask = np.asarray(mask)
    if mask.shape != (height, width):
      raise StoreError(f"{where}: mask shape {mask.shape}, image is {(height, width)}")
    bad = np.setdiff1d(np.unique(mask), MASK_VALUES)
    if bad.size:
      raise StoreError(f"{where}: mask values {bad.tolist()} outside {MASK_VALUES}")
    encoded_mask = encode_png(mask.astype(np.uint8))
  elif mask is not None:
    raise StoreError(f"{where}: a generation sample has no mask")
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


def query_samples(images: Sequence[ImageLike], texts: Sequence[str]) -> list[Sample]:
  """Segmentation records of a caller's images, one text each, without ground truth: their
  masks are all ignore. Files stay encoded as they are (id: the path); arrays and PIL images
  are stored as PNG (id `image-{i}`)."""
  if len(images) != len(texts):
    raise StoreError(f"one text per image: got {len(images)} images, {len(texts)} texts")
  samples = []
  for i, (image, text) in enumerate(zip(images, texts, strict=True)):
    if isinstance(image, str):
      data = fileio.read_bytes(image)
      try:
        height, width = image_size(data)
      except (StoreError, OSError) as e:
        raise StoreError(f"{image}: not a readable JPEG or PNG image ({e})") from e
      sample_id, source = image, {"path": image}
    else:
      data = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
      if data.ndim != 3 or data.shape[-1] != 3 or data.dtype != np.uint8:
        raise StoreError(
          f"image {i}: expected an (H, W, 3) uint8 array, got {data.dtype} {data.shape}"
        )
      height, width = data.shape[:2]
      sample_id, source = f"image-{i}", {}
    mask = np.full((height, width), masks.IGNORE, np.uint8)
    samples.append(
      make_sample(
        sample_id=sample_id, task="segmentation", image=data, text=text, source=source, mask=mask
      )
    )
  return samples


def caption_samples(captions: Sequence[str]) -> list[Sample]:
  """Generation records of captions whose images are yet to be generated (a black one stands in)."""
  placeholder = np.zeros((8, 8, 3), np.uint8)
  return [
    make_sample(sample_id=f"prompt-{i}", task="generation", image=placeholder, text=c, source={})
    for i, c in enumerate(captions)
  ]


def encode_sample(sample: Sample) -> bytes:
  return msgpack.packb(sample, use_bin_type=True)


def decode_sample(raw: bytes, where: str) -> Sample:
  """The record in `raw`; StoreError naming `where` (shard and index) if it is malformed."""
  try:
    sample = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise StoreError(f"{where}: not a msgpack record ({e!r})") from e
  if not isinstance(sample, dict):
    raise StoreError(f"{where}: expected a msgpack map, got {type(sample).__name__}")
  for key, kind in _FIELDS.items():
    if not isinstance(sample.get(key), kind):
      raise StoreError(f"{where}: field {key!r} missing or not {kind.__name__}")
  if sample["format_version"] != FORMAT_VERSION:
    raise StoreError(
      f"{where}: format version {sample['format_version']}, this code reads {FORMAT_VERSION}"
    )
  if sample["task"] not in tasks.NAMES:
    raise StoreError(f"{where}: task {sample['task']!r} is not one of {tasks.NAMES}")
  if (sample["task"] == "segmentation") != isinstance(sample.get("mask"), bytes):
    raise StoreError(f"{where}: task {sample['task']!r} with mask {type(sample.get('mask'))}")
  return sample


def decode_image(sample: Sample) -> np.ndarray:
  """RGB uint8 (H, W, 3); StoreError naming the sample if the bytes do not decode."""
  flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # Masks index the stored pixels.
  image = cv2.imdecode(np.frombuffer(sample["image"], np.uint8), flags)
  if image is None or image.shape[:2] != (sample["height"], sample["width"]):
    got = None if image is None else image.shape
    raise StoreError(
      f"sample {sample['id']!r}: image does not decode to "
      f"{(sample['height'], sample['width'])} ({sample['image_format']}, decoded {got})"
    )
  return image[..., ::-1]


def decode_mask(sample: Sample) -> np.ndarray:
  """uint8 (H, W) with values {0, 1, 255}."""
  mask = cv2.imdecode(np.frombuffer(sample["mask"], np.uint8), cv2.IMREAD_UNCHANGED)
  if mask is None or mask.shape != (sample["height"], sample["width"]):
    raise StoreError(
      f"sample {sample['id']!r}: mask does not decode to {(sample['height'], sample['width'])}"
    )
  return mask


class RecordWriter:
  """Writes a store shard by shard; `close()` (or leaving the `with` block) finishes it.

  Refuses a directory that already holds anything unless `overwrite`; even then it only
  removes store files and refuses a directory holding anything else.
  """

  def __init__(self, path: str, shard_size: int, *, overwrite: bool = False, info=None):
    if shard_size < 1:
      raise ValueError(f"shard_size must be positive, got {shard_size}")
    names = fileio.listdir(path)
    if names:
      if not overwrite:
        raise FileExistsError(f"{path} is not empty; pass --overwrite to replace it")
      others = sorted(n for n in names if not store.is_store_file(n))
      if others:
        raise FileExistsError(f"{path} holds files that are not a sample store: {others}")
      for name in names:
        fileio.remove(os.path.join(path, name))
    fileio.makedirs(path)
    self.path, self.shard_size, self.info = path, shard_size, dict(info or {})
    self._seen: set[str] = set()
    self._tasks: dict[str, int] = {}
    self._shards: list[dict] = []  # Part entries of the published shards.
    self._shard: store.StagedShard | None = None
    self._writer = None
    self._shard_ids: list[str] = []

  def write(self, sample: Sample) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    if sample["id"] in self._seen:
      raise StoreError(f"{self.path}: sample id {sample['id']!r} written twice")
    if len(self._shard_ids) == self.shard_size:
      self._close_shard()
    if self._shard is None:
      stem = store.shard_stem(KIND, 0, 1, len(self._shards))
      self._shard = store.StagedShard(self.path, stem, SUFFIXES)
      # Images are already compressed; one record per chunk keeps random reads cheap.
      self._writer = ArrayRecordWriter(self._shard.local["records"], "group_size:1,uncompressed")
    self._writer.write(encode_sample(sample))
    self._shard_ids.append(sample["id"])
    self._seen.add(sample["id"])
    self._tasks[sample["task"]] = self._tasks.get(sample["task"], 0) + 1

  def _close_shard(self, publish: bool = True) -> None:
    if self._shard is not None:
      self._writer.close()
      if publish:
        self._shards.append(self._shard.publish(self._shard_ids))
      self._shard.discard()
      self._shard, self._writer, self._shard_ids = None, None, []

  def close(self) -> store.StoreMeta:
    """Finishes the store and returns its metadata."""
    self._close_shard()
    layout = store.StoreLayout(len(self._seen), 1, self.shard_size)
    meta = store.StoreMeta(KIND, layout, RecordMeta(self._tasks, self.info))
    store.write_meta(self.path, meta)
    store.write_part(self.path, layout, 0, self._shards)  # Last: the store is complete.
    return meta

  def __enter__(self) -> RecordWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self._close_shard(publish=False)  # No part: the store stays unfinished.


class RecordReader(store.ArrayRecordReader):
  """Random access to a store by index and by id; picklable (shards open lazily)."""

  kind, meta_type, role = KIND, RecordMeta, "records"

  def __getitem__(self, index: int) -> Sample:
    return decode_sample(*self.raw(index))

  def get(self, sample_id: str) -> Sample:
    sample = self[self.index_of(sample_id)]
    if sample["id"] != sample_id:
      raise StoreError(f"{self.path}: its part places {sample_id!r} where {sample['id']!r} is")
    return sample

  def get_all(self, sample_ids: Sequence[str], task: str) -> list[Sample]:
    """The samples `sample_ids`, in order; each must be a `task` sample."""
    samples = [self.get(sample_id) for sample_id in sample_ids]
    for sample in samples:
      if sample["task"] != task:
        raise StoreError(
          f"{self.path}: sample {sample['id']!r} is a {sample['task']} sample, expected {task}"
        )
    return samples

  def __iter__(self) -> Iterator[Sample]:
    for i in range(len(self)):
      yield self[i]
