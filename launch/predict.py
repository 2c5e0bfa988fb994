r"""Segments images by text with a trained GenMask model: one DiT forward pass per query.

  python -m launch.predict --workdir=runs/genmask \
      --vlm=Qwen2.5-VL-7B-Instruct --image=street.jpg --text="the red car" --out=predictions

  python -m launch.predict --workdir=runs/genmask \
      --records=data/refcoco_val --features=features/refcoco_val_qwen7b \
      --sample_id=ID1 --sample_id=ID2 --out=predictions

Queries are image files with texts (one --text per --image, or one for all) and samples of a
sample store; their texts are encoded by the VLM in-process (--vlm, images given to it by the
run's image policy) or read from the store's feature store (--features). --reasoning: the VLM
first rewrites each text into an explicit target (ReasonSeg's two stages), or --features holds
such rewrites. The model is the latest checkpoint under --workdir with the run's own config
(genmask_jax/inference/run.py); --config and --config.x=y apply on top. Query i writes
`{out}/{i:03d}_{name}_mask.png`, the mask at the image's own size (0 background, 255
foreground), and `..._overlay.png`, the image with the mask in red.
"""

from __future__ import annotations

import os
import re

import numpy as np
from absl import app, flags
from PIL import Image

from genmask_jax import config_check
from genmask_jax.data import records
from genmask_jax.evaluation import report
from genmask_jax.inference import queries, run
from genmask_jax.runtime import fileio, log_filter
from launch import queries as query_flags

flags.adopt_module_key_flags(query_flags)  # --help lists the shared flags too.
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file (JPEG or PNG); repeatable.")
_TEXT = flags.DEFINE_multi_string("text", [], "What to segment: one per --image or one for all.")
_REASONING = flags.DEFINE_bool(
  "reasoning", False, "Reasoning segmentation: the VLM rewrites each text into a target first."
)
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
  log_filter.quiet_library_logs()
  spec = query_flags.run_config(argv)
  config_check.validate(spec.config, "model")
  samples = _command_line_records() + query_flags.store_records("segmentation")
  hidden = query_flags.text_features(spec, samples, _REASONING.value)
  resolution = spec.config.data.segmentation.resolution
  examples = queries.examples(spec, samples, hidden, resolution)
  masks = queries.segment(run.load(spec), examples, query_flags.BATCH_SIZE.value)
  fileio.makedirs(_OUT.value)
  for i, (sample, mask) in enumerate(zip(samples, masks, strict=True)):
    base = os.path.join(_OUT.value, f"{i:03d}_{_name(sample)}")
    fileio.save_image(f"{base}_mask.png", Image.fromarray(mask.astype(np.uint8) * 255))
    overlay = report.paint(records.decode_image(sample), mask, report.PREDICTION_RGB)
    fileio.save_image(f"{base}_overlay.png", Image.fromarray(overlay))
    print(f"{sample['id']} {sample['text']!r}: {base}_mask.png {base}_overlay.png")


if __name__ == "__main__":
  app.run(main, flags_parser=run.parse_flags)
