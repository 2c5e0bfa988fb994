r"""Segments images by text with a trained GenMask model: one DiT forward pass per query.

  python -m launch.predict --config=configs/genmask.py --workdir=runs/genmask \
      --vlm=Qwen2.5-VL-7B-Instruct --image=street.jpg --text="the red car" --out=predictions

  python -m launch.predict --config=configs/genmask.py --workdir=runs/genmask \
      --records=data/refcoco_val --features=features/refcoco_val_qwen7b \
      --sample_id=ID1 --sample_id=ID2 --out=predictions

Queries are image files with texts (one --text per --image, or one for all) and samples of a
sample store; their texts are encoded by the VLM in-process (--vlm) or read from the store's
feature store (--features). The model is the latest checkpoint under --workdir; --config is
its training config. Query i writes `{out}/{i:03d}_{name}_mask.png`, the mask at the image's
own size (0 background, 255 foreground), and `..._overlay.png`, the image with the mask in red.
"""

from __future__ import annotations

import os
import re

import numpy as np
from absl import app, flags
from PIL import Image

from genmask_jax import fileio, inference
from genmask_jax.data import records
from genmask_jax.evaluation import report, resize
from launch import queries

_IMAGE = flags.DEFINE_multi_string("image", [], "Image file (JPEG or PNG); repeatable.")
_TEXT = flags.DEFINE_multi_string("text", [], "What to segment: one per --image or one for all.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)


def _command_line_records() -> list[records.Sample]:
  images, texts = _IMAGE.value, _TEXT.value
  if len(texts) == 1 and images:
    texts = texts * len(images)
  if len(texts) != len(images):
    raise app.UsageError(
      f"give one --text per --image, or one for all: got {len(images)} images, {len(texts)} texts"
    )
  return [queries.segmentation_record(p, t) for p, t in zip(images, texts, strict=True)]


def _name(sample: records.Sample) -> str:
  stem = os.path.splitext(os.path.basename(sample["id"]))[0]
  return re.sub(r"[^\w.-]+", "_", stem)


def main(argv: list[str]) -> None:
  del argv
  config = queries.CONFIG.value
  samples = _command_line_records() + queries.store_records("segmentation")
  hidden = queries.text_features(samples, config)
  examples = queries.examples(samples, hidden, config.data.segmentation.resolution, config.data)
  logits = []
  with queries.trained_model(config) as model:
    segment = inference.segmenter(model.models, config)
    for batch, real in queries.batches(examples, ("image", "text", "text_mask"), model.mesh):
      predicted = segment(
        model.params, model.vae_params, batch["image"], batch["text"], batch["text_mask"]
      )
      logits.extend(np.asarray(predicted)[:real])
  fileio.makedirs(_OUT.value)
  for i, (sample, example, sample_logits) in enumerate(zip(samples, examples, logits, strict=True)):
    mask = resize.undo_resize(sample_logits, example["size"], example["resized_size"]) > 0
    image = records.decode_image(sample)
    base = os.path.join(_OUT.value, f"{i:03d}_{_name(sample)}")
    fileio.save_image(f"{base}_mask.png", Image.fromarray(mask.astype(np.uint8) * 255))
    overlay = report.paint(image, mask, report.PREDICTION_RGB)
    fileio.save_image(f"{base}_overlay.png", Image.fromarray(overlay))
    print(f"{sample['id']} {sample['text']!r}: {base}_mask.png {base}_overlay.png")


if __name__ == "__main__":
  app.run(main)
