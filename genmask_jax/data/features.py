"""The VLM feature store: per-sample encoder hidden states, row i for sample i of a sample store.

A store of the protocol of data/store.py, kind "features", written by
`launch/precompute_vlm.py`: store.json holds the encoder (FeatureMeta: model id, prompt
template, stored dtype, hidden size, image policy) and the layout; shards
features-WWWWW-of-NNNNN-SSSSS.array_record hold msgpack records {id, text, dtype, shape,
hidden}, one a sample. Workers own disjoint contiguous slices of the sample store; an
interrupted run resumes by skipping the shards that exist. Records never hold pickles: hidden
states are raw bf16/fp16 bytes plus a shape. The width of a store's features is
`FeatureReader(path).meta.hidden_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from genmask_jax.data import store
from genmask_jax.data.store import StoreError, StoreLayout

KIND = "features"
SUFFIXES = {"features": ".array_record"}
STORE_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
FeatureError = StoreError  # The name callers catch a wrong or mismatched feature store by.


@dataclasses.dataclass(frozen=True)
class FeatureMeta:
  model_id: str
  prompt_template: str
  dtype: str
  hidden_size: int
  image_policy: dict  # vlm/image_policy.ImagePolicy.to_record() of the images encoded.


class FeatureItem(NamedTuple):
  id: str
  text: str  # What was encoded: the target / caption, or the VLM's rewrite in reasoning mode.
  hidden: np.ndarray  # (L, hidden_size), any float dtype; stored as meta.dtype.


def check_meta(meta: FeatureMeta, model_id: str, prompt_template: str) -> None:
  """Raises StoreError unless the store was encoded by `model_id` with `prompt_template`."""
  if meta.model_id != model_id:
    raise StoreError(
      f"feature store was encoded by model {meta.model_id!r}, expected {model_id!r}: "
      f"re-run launch/precompute_vlm.py with {model_id!r}, or, if {meta.model_id!r} is the "
      f"encoder you mean to use, set --config.data.encoder_model_id={meta.model_id}"
    )
  if meta.prompt_template != prompt_template:
    raise StoreError(
      f"feature store was encoded with prompt template {meta.prompt_template!r}, "
      f"expected {prompt_template!r}: re-run launch/precompute_vlm.py"
    )


def check_encoder(meta: FeatureMeta, expected: FeatureMeta, where: str) -> None:
  """Raises StoreError naming `where` unless `meta`'s features are those `expected` describes:
  the same encoder and prompt template, and as wide (the model's text width)."""
  try:
    check_meta(meta, expected.model_id, expected.prompt_template)
  except StoreError as e:
    raise StoreError(f"{where}: {e}") from e
  if meta.hidden_size != expected.hidden_size:
    raise StoreError(
      f"{where}: text features of width {meta.hidden_size}, the model reads "
      f"{expected.hidden_size} (dit.text_dim)"
    )


def encode_record(item: FeatureItem, dtype: str) -> bytes:
  hidden = np.asarray(item.hidden)
  if hidden.ndim != 2:
    raise StoreError(f"sample {item.id!r}: hidden states must be (L, hidden), got {hidden.shape}")
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
    raise StoreError(f"{where}: not a feature record ({e!r})") from e
  if len(shape) != 2 or len(buf) != dtype.itemsize * shape[0] * shape[1]:
    raise StoreError(f"{where}: sample {sample_id!r} holds {len(buf)} bytes for shape {shape}")
  hidden = np.frombuffer(buf, dtype).reshape(shape).astype(np.float32)
  return FeatureItem(sample_id, text, hidden)


class FeatureWriter(store.ShardedWriter):
  """Writes one worker's shards of a store; safe to re-create after an interruption."""

  def __init__(self, path: str, meta: FeatureMeta, layout: StoreLayout, worker_index: int):
    if meta.dtype not in STORE_DTYPES:
      raise StoreError(f"{path}: dtype {meta.dtype!r} is not one of {sorted(STORE_DTYPES)}")
    super().__init__(path, KIND, meta, layout, worker_index, SUFFIXES)

  def write_shard(self, shard_index: int, items: Sequence[FeatureItem]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    for item in items:
      if np.ndim(item.hidden) != 2 or item.hidden.shape[1] != self.meta.hidden_size:
        raise StoreError(
          f"sample {item.id!r}: hidden states {np.shape(item.hidden)}, expected "
          f"(L, {self.meta.hidden_size})"
        )

    def write(local: dict[str, str]) -> None:
      writer = ArrayRecordWriter(local["features"], "group_size:1")
      for item in items:
        writer.write(encode_record(item, self.meta.dtype))
      writer.close()

    self.publish_shard(shard_index, [item.id for item in items], write)


class FeatureReader(store.ArrayRecordReader):
  """Random access to a complete store by row index or sample id; picklable (shards open
  lazily). `meta` is its FeatureMeta, `layout` its StoreLayout."""

  kind, meta_type, role = KIND, FeatureMeta, "features"

  def __getitem__(self, index: int) -> FeatureItem:
    raw, where = self.raw(index)
    item = decode_record(raw, where)
    if item.id != self.ids()[index] or item.hidden.shape[1] != self.meta.hidden_size:
      raise StoreError(
        f"{where}: holds sample {item.id!r} shape {item.hidden.shape}, the store says "
        f"{self.ids()[index]!r} with hidden size {self.meta.hidden_size}"
      )
    return item

  def get(self, sample_id: str) -> np.ndarray:
    """(L_real_tokens, hidden_size) float32 hidden states of one sample."""
    return self[self.index_of(sample_id)].hidden

  def text(self, sample_id: str) -> str:
    """The text that was encoded (the VLM's rewritten target in reasoning mode)."""
    return self[self.index_of(sample_id)].text
