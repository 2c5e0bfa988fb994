r"""Segments images by text with a trained GenMask run: one DiT forward pass per query.

  python -m launch.predict --workdir=runs/genmask \
      --vlm=Qwen2.5-VL-7B-Instruct --image=street.jpg --text="the red car" --out=predictions

  python -m launch.predict --workdir=runs/genmask \
      --records=data/refcoco_val --features=features/refcoco_val_qwen7b \
      --sample_id=ID1 --sample_id=ID2 --out=predictions

Queries are image files with texts (one --text per --image, or one for all) and samples of a
sample store (launch/common/run_flags.py); --reasoning: the VLM first rewrites each text into an
explicit target (ReasonSeg's two stages), or --features holds such rewrites. Query i writes
`{out}/{i:03d}_{name}_mask.png`, the mask at the image's own size (0 background, 255
foreground), and `..._overlay.png`, the image with the mask in red.

From flag to mask: main -> launch/common/run_flags.py (the queries, the run) ->
genmask_jax/inference/genmask.py (`GenMask.segment_samples`) -> genmask_jax/runs/model.py
(the weights, the jitted segmenter).
"""

from __future__ import annotations

from absl import app, flags

from genmask_jax.evaluation import report
from genmask_jax.runtime import log_filter
from launch.common import run_flags

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
  samples = run_flags.samples(RUN, "segmentation", _TEXT.value, _IMAGE.value)
  model = run_flags.open_run(RUN, argv)
  masks = model.segment_samples(
    samples,
    features=RUN.features.value,
    reasoning=_REASONING.value,
    batch_size=RUN.batch_size.value,
  )
  for sample, base in zip(samples, report.save_masks(_OUT.value, samples, masks), strict=True):
    print(f"{sample['id']} {sample['text']!r}: {base}_mask.png {base}_overlay.png")


if __name__ == "__main__":
  app.run(main, flags_parser=run_flags.parse_flags)
