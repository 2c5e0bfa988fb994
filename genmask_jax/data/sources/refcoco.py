"""RefCOCO / RefCOCO+ / RefCOCOg: one segmentation sample per (ref, sentence).

Three inputs give the same samples:
  * the REFER files `{dataset}/refs({split_by}).p` + `{dataset}/instances.json` + COCO train2014
    images (the pickle is read by an unpickler that can build nothing but builtin containers);
  * the TFDS manual-download `refcoco.json` (refs with their annotation inlined) + images;
  * a prepared TFDS `ref_coco` builder, read with `tfds.data_source` (no TensorFlow). It holds
    no ref ids and only the raw sentences, so its samples carry `ref_id=None` and raw text.

Masks are the pycocotools rasterization of the referred annotation (polygons merged), at the
image's resolution. Splits keep the REFER names (train, val, testA, testB, test); TFDS's
"validation" becomes "val". Sample ids: `{dataset}_{split_by}/{split}/ann{ann_id}/sent{sent_id}`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from genmask_jax.data import records
from genmask_jax.data.sources.coco import rasterize

SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
TEXT_FIELDS = ("sent", "raw")
_TFDS_DATASETS = {"refcoco": "refcoco", "refcocoplus": "refcoco+", "refcocog": "refcocog"}


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
  """Builds lists, dicts, tuples, strings and numbers; refuses every class or function."""

  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only builtin data allowed")


def load_refs_pickle(path: str) -> list[dict]:
  """The list of refs in an upstream `refs(*).p` file (Python 2 pickles included)."""
  try:
    with open(path, "rb") as f:
      refs = _BuiltinsOnlyUnpickler(f, encoding="utf-8").load()
  except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as e:
    raise records.RecordError(f"{path}: not a REFER refs pickle of plain data ({e})") from e
  if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
    raise records.RecordError(f"{path}: expected a list of ref dicts")
  return refs


def refer_refs(refer_dir: str, dataset: str, split_by: str) -> tuple[list[dict], dict]:
  """(refs, images by id) from the REFER files; each ref gets its annotation as `ann`."""
  folder = os.path.join(refer_dir, dataset)
  refs = load_refs_pickle(os.path.join(folder, f"refs({split_by}).p"))
  with open(os.path.join(folder, "instances.json")) as f:
    instances = json.load(f)
  anns = {a["id"]: a for a in instances["annotations"]}
  for ref in refs:
    if ref["ann_id"] not in anns:
      raise records.RecordError(
        f"{folder}: ref {ref['ref_id']} names annotation {ref['ann_id']}, "
        "absent from instances.json"
      )
    ref["ann"] = anns[ref["ann_id"]]
  return refs, {im["id"]: im for im in instances["images"]}


def tfds_json_refs(json_path: str, dataset: str, split_by: str) -> tuple[list[dict], dict]:
  """(refs, images by id) of one data set and partition of a TFDS `refcoco.json`."""
  with open(json_path) as f:
    data = json.load(f)
  refs = [r for r in data["ref"] if r["dataset"] == dataset and r["dataset_partition"] == split_by]
  if not refs:
    raise records.RecordError(f"{json_path}: no refs of {dataset} ({split_by})")
  return refs, {int(k): v["info"] for k, v in data["coco_anns"].items()}


def tfds_json_image_dir(json_path: str) -> str:
  """Where TFDS's manual download keeps the COCO train2014 images: beside refcoco.json."""
  return os.path.join(os.path.dirname(json_path), "coco_train2014")


def sample_id(dataset: str, split_by: str, split: str, ann_id: int, sent_id: int) -> str:
  return f"{dataset}_{split_by}/{split}/ann{ann_id}/sent{sent_id}"


def _sample(image, mask: np.ndarray, text: str, source: dict) -> records.Sample:
  ids = (source[k] for k in ("dataset", "split_by", "split", "ann_id", "sent_id"))
  return records.make_sample(
    sample_id=sample_id(*ids),
    task="segmentation",
    image=image,
    mask=mask,
    text=text,
    source=source,
  )


def samples_from_refs(
  refs: Sequence[dict],
  images: Mapping[int, dict],
  image_dir: str,
  dataset: str,
  split_by: str,
  text_field: str = "sent",
) -> Iterator[tuple[str, records.Sample]]:
  """(split, sample) for every sentence of every ref, by split, ref id and sentence id."""
  if text_field not in TEXT_FIELDS:
    raise ValueError(f"text_field {text_field!r} is not one of {TEXT_FIELDS}")
  for ref in sorted(refs, key=lambda r: (r["split"], r["ref_id"])):
    try:
      info = images[ref["image_id"]]
      with open(os.path.join(image_dir, info["file_name"]), "rb") as f:
        image = f.read()
      mask = rasterize(ref["ann"]["segmentation"], info["height"], info["width"])
    except (OSError, records.RecordError, KeyError, TypeError) as e:
      raise records.RecordError(
        f"ref {ref['ref_id']} (image {ref['image_id']}): {type(e).__name__}: {e}"
      ) from e
    for sent in sorted(ref["sentences"], key=lambda s: s["sent_id"]):
      source = dict(
        dataset=dataset,
        split_by=split_by,
        split=ref["split"],
        image_id=ref["image_id"],
        ann_id=ref["ann_id"],
        ref_id=ref["ref_id"],
        sent_id=sent["sent_id"],
        category_id=ref["category_id"],
      )
      yield ref["split"], _sample(image, mask, sent[text_field], source)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def samples_from_tfds_example(
  example: Mapping[str, Any], config: str, split: str
) -> list[records.Sample]:
  """The samples of one `ref_coco` example as `tfds.data_source` returns it (numpy).

  `config` is the builder config ("refcoco_unc", "refcocoplus_unc", ...). The image is the
  stored JPEG with decoders={"image": tfds.decode.SkipDecoding()}, else a decoded array (then
  stored as PNG). Per object, the mask is a decoded (H, W, 3) image in {0, 255}.
  """
  name, split_by = config.rsplit("_", 1)
  dataset, split = _TFDS_DATASETS[name], "val" if split == "validation" else split
  image = example["image"]
  image = image if isinstance(image, bytes) else np.asarray(image, np.uint8)
  objects = example["objects"]
  out = []
  for i, ann_id in enumerate(np.asarray(objects["id"]).tolist()):
    mask = np.asarray(objects["mask"][i])
    mask = ((mask[..., 0] if mask.ndim == 3 else mask) > 0).astype(np.uint8)
    sent_ids = np.asarray(objects["refexp"]["refexp_id"][i]).tolist()
    for sent_id, raw in zip(sent_ids, objects["refexp"]["raw"][i], strict=True):
      source = dict(
        dataset=dataset,
        split_by=split_by,
        split=split,
        image_id=int(example["image/id"]),
        ann_id=ann_id,
        ref_id=None,
        sent_id=sent_id,
        category_id=int(objects["label"][i]),
      )
      out.append(_sample(image, mask, _text(raw), source))
  return sorted(out, key=lambda s: (s["source"]["ann_id"], s["source"]["sent_id"]))


def tfds_samples(data_dir: str, config: str, split: str) -> Iterator[records.Sample]:
  """Samples of a prepared `ref_coco/{config}` split (reads ArrayRecord, no TensorFlow)."""
  import tensorflow_datasets as tfds

  source = tfds.data_source(
    f"ref_coco/{config}",
    split=split,
    data_dir=data_dir,
    download=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  for i in range(len(source)):
    yield from samples_from_tfds_example(source[i], config, split)
