"""Text-to-image pairs: a folder of images with same-name `.txt` captions, or a JSONL file of
{"image": path (relative to the file), "caption": str, "id": optional str}.

JPEG and PNG bytes are kept as they are; other formats PIL reads (WebP, ...) are stored as PNG.
Sample ids: `{name}/{image path without extension}` (folder) or `{name}/{id or line number}`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from genmask_jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_image(path: str) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  try:
    records.image_format(data)
  except records.RecordError:
    try:
      with Image.open(path) as image:
        return records.encode_png(np.asarray(image.convert("RGB")))
    except OSError as e:
      raise records.RecordError(f"{path}: not an image PIL can read ({e})") from e
  return data


def _sample(sample_id: str, image_path: str, caption: str, name: str) -> records.Sample:
  if not caption.strip():
    raise records.RecordError(f"{image_path}: empty caption")
  return records.make_sample(
    sample_id=sample_id,
    task="generation",
    image=read_image(image_path),
    text=caption.strip(),
    source=dict(dataset=name, image=image_path),
  )


def folder_samples(folder: str, name: str) -> Iterator[records.Sample]:
  """Every image under `folder` (recursively, sorted) with its `.txt` caption."""
  paths = sorted(
    os.path.join(root, f)
    for root, _, files in os.walk(folder)
    for f in files
    if f.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not paths:
    raise records.RecordError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  for path in paths:
    stem = os.path.splitext(path)[0]
    if not os.path.exists(stem + ".txt"):
      raise records.RecordError(f"{path}: no caption file {stem}.txt")
    with open(stem + ".txt") as f:
      caption = f.read()
    yield _sample(f"{name}/{os.path.relpath(stem, folder)}", path, caption, name)


def jsonl_samples(path: str, name: str) -> Iterator[records.Sample]:
  folder = os.path.dirname(os.path.abspath(path))
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        entry = json.loads(line)
        image, caption = entry["image"], entry["caption"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise records.RecordError(f"{where}: expected {{'image', 'caption'}} ({e!r})") from e
      sample_id = f"{name}/{entry.get('id', line_number)}"
      yield _sample(sample_id, os.path.join(folder, image), caption, name)
