"""ReasonSeg: `name.jpg` + `name.json` (labelme-like) per image, one folder per split.

The JSON holds {"text": [query, ...], "is_sentence": bool, "shapes": [{"label", "points"}]}.
Masks are drawn with OpenCV as upstream: "flag" shapes skipped, polygons sorted by area
(largest first), each outlined (thickness 1) and filled with 255 if its label contains
"ignore", else 1. Sample ids: `reasonseg/{split}/{name}/{text index}`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

from genmask_jax.data import masks, records

TEXTS = ("all", "first")  # Every query of an image, or the first (the evaluation protocol).
SPLITS = ("train", "val", "test")  # Folders of the data set's root.


def default_texts(split: str) -> str:
  """Training takes every query of an image; evaluation the first, as the protocol does."""
  return "all" if split == "train" else "first"


def rasterize_shapes(shapes: Sequence[dict], height: int, width: int) -> np.ndarray:
  """uint8 (height, width) in {0, 1, 255}."""
  polygons, areas = [], []
  for shape in shapes:
    if shape["label"].lower() == "flag":
      continue
    points = np.array([shape["points"]], dtype=np.int32)
    alone = np.zeros((height, width), np.uint8)
    cv2.polylines(alone, points, True, 1, 1)
    cv2.fillPoly(alone, points, 1)
    polygons.append((shape["label"], points))
    areas.append(int(alone.sum()))
  mask = np.zeros((height, width), np.uint8)
  for i in np.argsort(areas, kind="stable")[::-1]:
    label, points = polygons[i]
    value = masks.IGNORE if "ignore" in label.lower() else masks.FOREGROUND
    cv2.polylines(mask, points, True, value, 1)
    cv2.fillPoly(mask, points, value)
  return mask


def _annotation(path: str) -> dict:
  with open(path) as f:
    ann = json.load(f)
  texts = [ann["text"]] if isinstance(ann.get("text"), str) else ann.get("text")
  if not texts or not all(isinstance(t, str) for t in texts):
    raise records.RecordError(f"{path}: 'text' must be a non-empty list of strings")
  if not isinstance(ann.get("shapes"), list):
    raise records.RecordError(f"{path}: 'shapes' must be a list")
  return dict(ann, text=texts)


def reasonseg_samples(split_dir: str, split: str, texts: str = "all") -> Iterator[records.Sample]:
  if texts not in TEXTS:
    raise ValueError(f"texts {texts!r} is not one of {TEXTS}")
  names = sorted(n[: -len(".json")] for n in os.listdir(split_dir) if n.endswith(".json"))
  if not names:
    raise records.RecordError(f"{split_dir}: no ReasonSeg .json files")
  for name in names:
    json_path = os.path.join(split_dir, name + ".json")
    ann = _annotation(json_path)
    with open(os.path.join(split_dir, name + ".jpg"), "rb") as f:
      image = f.read()
    try:
      mask = rasterize_shapes(ann["shapes"], *records.image_size(image))
    except (KeyError, TypeError, ValueError, cv2.error) as e:
      raise records.RecordError(f"{json_path}: bad shapes ({e!r})") from e
    chosen = ann["text"] if texts == "all" else ann["text"][:1]
    for k, text in enumerate(chosen):
      yield records.make_sample(
        sample_id=f"reasonseg/{split}/{name}/{k}",
        task="segmentation",
        image=image,
        mask=mask,
        text=text,
        source=dict(
          dataset="reasonseg",
          split=split,
          image=name,
          text_index=k,
          is_sentence=bool(ann.get("is_sentence", False)),
        ),
      )
