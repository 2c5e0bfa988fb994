r"""Segments images by text with a trained GenMask run: one DiT forward pass per query.

  python -m launch.predict --workdir=runs/genmask \
      --vlm=Qwen2.5-VL-7B-Instruct --image=street.jpg --text="the red car" --out=predictions

  python -m launch.predict --workdir=runs/genmask \
      --records=data/refcoco_val --features=features/refcoco_val_qwen7b \
      --sample_id=ID1 --sample_id=ID2 --out=predictions

Queries are image files with texts (one --text per --image, or one for all) and samples of a
sample store (launch/run_flags.py); --reasoning: the VLM first rewrites each text into an
explicit target (ReasonSeg's two stages), or --features holds such rewrites. Query i writes
`{out}/{i:03d}_{name}_mask.png`, the mask at the image's own size (0 background, 255
foreground), and `..._overlay.png`, the image with the mask in red.
"""

from __future__ import annotations

import os
import re

import numpy as np
from absl import app, flags
from PIL import Image

from genmask_jax.data import records
from genmask_jax.evaluation import report
from genmask_jax.inference import queries
from genmask_jax.runtime import fileio, log_filter
from launch import run_flags

RUN = run_flags.define()
flags.adopt_module_key_flags(run_flags)  # --help lists the shared flags too.
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file (JPEG or PNG); repeatable.")
_TEXT = flags.DEFINE_multi_string("text", [], "What to segment: one per --image or one for all.")
_REASONING = flags.DEFINE_bool(
  "reasoning", False, "Reasoning segmentation: the VLM rewrites each text into a target first."
)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)


def main(argv: list[str]) -> None:
  log_filter.quiet_library_logs()
  images, texts = _IMAGE.value, _TEXT.value
  texts = texts * len(images) if len(texts) == 1 else texts
  if len(texts) != len(images):
    raise app.UsageError(
      f"give one --text per --image, or one for all: got {len(images)} images, {len(texts)} texts"
    )
  model = run_flags.open_run(RUN, argv)
  given = [
    queries.segmentation_record(p, t, i) for i, (p, t) in enumerate(zip(images, texts, strict=True))
  ]
  samples = run_flags.samples(RUN, given, "segmentation")
  masks = model.segment_samples(
    samples,
    features=RUN.features.value,
    reasoning=_REASONING.value,
    batch_size=RUN.batch_size.value,
  )
  fileio.makedirs(_OUT.value)
  for i, (sample, mask) in enumerate(zip(samples, masks, strict=True)):
    name = re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(sample["id"]))[0])
    base = os.path.join(_OUT.value, f"{i:03d}_{name}")
    fileio.save_image(f"{base}_mask.png", Image.fromarray(mask.astype(np.uint8) * 255))
    overlay = report.paint(records.decode_image(sample), mask, report.PREDICTION_RGB)
    fileio.save_image(f"{base}_overlay.png", Image.fromarray(overlay))
    print(f"{sample['id']} {sample['text']!r}: {base}_mask.png {base}_overlay.png")


if __name__ == "__main__":
  app.run(main, flags_parser=run_flags.parse_flags)
