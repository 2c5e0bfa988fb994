"""Semantic segmentation as binary referring samples (LISA's recipe): ADE20K, COCO-Stuff,
PASCAL-Part.

One sample per (image, class): the mask is that class's pixels (ignored pixels are background)
and the text is the class name; sample ids are DATASET/SPLIT/IMAGE/CLASS. By default every
labelled class of an image becomes a sample, and training draws up to 3 of them per use of the
image (LISA's sampling: a source's `classes_per_use`, data/class_draws.py). With
`classes_per_image=k` only k classes are kept, drawn once, without replacement, by a generator
seeded with (seed, image name), so the draw depends neither on the order nor on the subset of
images converted (a smaller store; every epoch then sees the same classes). Images with no
labelled class give no sample and are logged.
"""

from __future__ import annotations

import collections
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence

import cv2
import numpy as np
from absl import logging

from genmask_jax.data import records
from genmask_jax.data.sources.coco import rasterize

# The class id of unlabeled pixels in class maps (COCO-Stuff's own value); binary masks drawn
# from a class map hold 0 there, so it is no mask value (data/masks.py).
UNLABELED = 255
ADE20K_SPLITS = ("training", "validation")
ADE20K_NUM_CLASSES = 150
COCOSTUFF_NUM_CLASSES = 182


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _draw(rng: np.random.Generator, classes: Sequence[int], k: int) -> list[int]:
  """k of the classes (0: all of them)."""
  if k == 0:
    return sorted(classes)
  return sorted(rng.choice(np.asarray(classes), size=min(k, len(classes)), replace=False).tolist())


def ade20k_class_names(path: str) -> list[str]:
  """The 150 names of ADE20K's `objectInfo150.txt` (tab-separated), first synonym of each."""
  names = {}
  with open(path) as f:
    for line in f.read().splitlines()[1:]:
      if line.strip():
        cols = line.split("\t")
        names[int(cols[0])] = cols[-1].split(",")[0].strip()
  if sorted(names) != list(range(1, ADE20K_NUM_CLASSES + 1)):
    raise records.RecordError(f"{path}: expected classes 1..{ADE20K_NUM_CLASSES}")
  return [names[i] for i in range(1, ADE20K_NUM_CLASSES + 1)]


def cocostuff_class_names(path: str) -> list[str]:
  """The 182 names of COCO-Stuff's `labels.txt` ("N: name", 0 = unlabeled), by pixel value."""
  names = {}
  with open(path) as f:
    for line in f:
      match = re.fullmatch(r"\s*(\d+)\s*:\s*(.+?)\s*", line)
      if match:
        names[int(match[1])] = match[2]
  names.pop(0, None)
  if sorted(names) != list(range(1, COCOSTUFF_NUM_CLASSES + 1)):
    raise records.RecordError(f"{path}: expected labels 1..{COCOSTUFF_NUM_CLASSES} as 'N: name'")
  return [names[i] for i in range(1, COCOSTUFF_NUM_CLASSES + 1)]


def ade20k_classes(label: np.ndarray) -> np.ndarray:
  """ADE20K label map -> class map: 0 (other) is ignored, class k is stored as k + 1."""
  return np.where(label == 0, UNLABELED, label.astype(np.int32) - 1).astype(np.uint8)


def cocostuff_classes(names: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
  """COCO-Stuff label map -> class map; the '-' classes (wall-other, ...) are ignored."""
  lut = np.full(256, UNLABELED, np.uint8)
  for i, name in enumerate(names):
    if "-" not in name:
      lut[i] = i

  def classes(label: np.ndarray) -> np.ndarray:
    bad = np.setdiff1d(np.unique(label), [*range(len(names)), UNLABELED])
    if bad.size:
      raise records.RecordError(f"label values {bad.tolist()} are not COCO-Stuff classes")
    return lut[label]

  return classes


def paired_files(image_dir: str, label_dir: str) -> list[tuple[str, str, str]]:
  """(name, image path, label path) for `name.jpg` in image_dir and `name.png` in label_dir."""
  images = {os.path.splitext(n)[0]: n for n in os.listdir(image_dir) if n.endswith(".jpg")}
  labels = {os.path.splitext(n)[0]: n for n in os.listdir(label_dir) if n.endswith(".png")}
  if images.keys() != labels.keys():
    raise records.RecordError(
      f"{image_dir} and {label_dir} do not pair up: images without a label "
      f"{sorted(images.keys() - labels.keys())[:5]}, labels without an image "
      f"{sorted(labels.keys() - images.keys())[:5]}"
    )
  return [
    (name, os.path.join(image_dir, images[name]), os.path.join(label_dir, labels[name]))
    for name in sorted(images)
  ]


def label_map_samples(
  dataset: str,
  split: str,
  files: Sequence[tuple[str, str, str]],
  to_classes: Callable[[np.ndarray], np.ndarray],
  names: Sequence[str],
  *,
  classes_per_image: int = 0,
  seed: int = 0,
) -> Iterator[records.Sample]:
  """Samples of data sets with per-pixel label maps (ADE20K, COCO-Stuff)."""
  for name, image_path, label_path in files:
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
      raise records.RecordError(f"{label_path}: not an 8-bit single-channel label map")
    try:
      classes = to_classes(label)
    except records.RecordError as e:
      raise records.RecordError(f"{label_path}: {e}") from e
    present = [c for c in np.unique(classes).tolist() if c != UNLABELED]
    if not present:
      logging.warning("%s: no labelled class, no sample", label_path)
      continue
    with open(image_path, "rb") as f:
      image = f.read()
    for c in _draw(_rng(seed, name), present, classes_per_image):
      yield records.make_sample(
        sample_id=f"{dataset}/{split}/{name}/{c}",
        task="segmentation",
        image=image,
        mask=(classes == c).astype(np.uint8),
        text=names[c],
        source=dict(dataset=dataset, split=split, image=name, class_id=c),
      )


def ade20k_samples(
  root: str, split: str, *, classes_per_image: int = 0, seed: int = 0
) -> Iterator[records.Sample]:
  """ADEChallengeData2016 under `root`: objectInfo150.txt (the class names),
  images/<split>/*.jpg and annotations/<split>/*.png (label maps); split `training` or
  `validation`."""
  names = ade20k_class_names(os.path.join(root, "objectInfo150.txt"))
  files = paired_files(
    os.path.join(root, "images", split), os.path.join(root, "annotations", split)
  )
  return label_map_samples(
    "ade20k",
    split,
    files,
    ade20k_classes,
    names,
    classes_per_image=classes_per_image,
    seed=seed,
  )


def pascal_part_samples(
  json_path: str,
  image_dir: str,
  split: str,
  *,
  classes_per_image: int = 0,
  seed: int = 0,
) -> Iterator[records.Sample]:
  """PASCAL-Part from a COCO-format file with "object:part" categories (VLPart's layout).

  A drawn part's mask is the union of its annotations in the image; its text is "obj part"
  or "the part of the obj", chosen by the same seeded generator.
  """
  with open(json_path) as f:
    data = json.load(f)
  names = {c["id"]: c["name"] for c in data["categories"]}
  anns = collections.defaultdict(lambda: collections.defaultdict(list))
  for ann in data["annotations"]:
    anns[ann["image_id"]][ann["category_id"]].append(ann)
  for info in sorted(data["images"], key=lambda im: im["id"]):
    by_class = anns[info["id"]]
    if not by_class:
      logging.warning("%s: image %s has no annotation, no sample", json_path, info["id"])
      continue
    rng = _rng(seed, str(info["id"]))
    with open(os.path.join(image_dir, info["file_name"]), "rb") as f:
      image = f.read()
    for c in _draw(rng, sorted(by_class), classes_per_image):
      mask = np.zeros((info["height"], info["width"]), np.uint8)
      for ann in by_class[c]:
        mask |= rasterize(ann["segmentation"], info["height"], info["width"])
      obj, part = (s.replace("_", " ") for s in names[c].split(":"))
      text = f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
      yield records.make_sample(
        sample_id=f"pascal_part/{split}/{info['id']}/{c}",
        task="segmentation",
        image=image,
        mask=mask,
        text=text,
        source=dict(dataset="pascal_part", split=split, image_id=info["id"], class_id=c),
      )
