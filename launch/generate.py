r"""Generates images from captions with a trained GenMask run; writes them as one grid PNG.

  python -m launch.generate --workdir=runs/genmask \
      --vlm=Qwen2.5-VL-7B-Instruct --prompt="a red bus on a bridge" --prompt="two cats" \
      --steps=50 --shift=5 --guidance=5 --seed=0 --resolution=512 --out=generated.png

Captions come from --prompt and from the generation samples --sample_id of --records
(launch/common/run_flags.py). Euler sampling with classifier-free guidance; --steps, --shift and
--guidance default to config.generate. The grid holds the images in order, --columns per row.
The same captions and seed give the same images.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import app, flags
from PIL import Image

from genmask_jax.runtime import fileio, log_filter
from launch.common import run_flags

RUN = run_flags.define()
flags.adopt_module_key_flags(run_flags)  # --help lists the shared flags too.
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A caption; repeatable.")
_STEPS = flags.DEFINE_integer("steps", None, "Euler steps; default config.generate.num_steps.")
_SHIFT = flags.DEFINE_float("shift", None, "Schedule shift; default config.generate.shift.")
_GUIDANCE = flags.DEFINE_float(
  "guidance", None, "Guidance scale; default config.generate.guidance_scale."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
_RESOLUTION = flags.DEFINE_integer(
  "resolution",
  None,
  "Image side, a multiple of the VAE's stride x the DiT's patch (16 for WAN); default "
  "config.data.generation.resolution.",
)
_COLUMNS = flags.DEFINE_integer("columns", 4, "Images per grid row.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Output PNG file.", required=True)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
  """(N, R, R, 3) uint8 -> one (rows R, min(N, columns) R, 3) image, black where none is left."""
  n, side = images.shape[:2]
  columns = min(n, columns)
  rows = math.ceil(n / columns)
  padded = np.zeros((rows * columns, *images.shape[1:]), np.uint8)
  padded[:n] = images
  tiles = padded.reshape(rows, columns, side, side, 3)
  return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * side, columns * side, 3)


def main(argv: list[str]) -> None:
  log_filter.quiet_library_logs()
  samples = run_flags.samples(RUN, "generation", _PROMPT.value)
  model = run_flags.open_run(RUN, argv)
  pixels = model.generate_samples(
    samples,
    features=RUN.features.value,
    seed=_SEED.value,
    guidance=_GUIDANCE.value,
    steps=_STEPS.value,
    shift=_SHIFT.value,
    resolution=_RESOLUTION.value,
    batch_size=RUN.batch_size.value,
  )
  fileio.makedirs(os.path.dirname(_OUT.value) or ".")
  fileio.save_image(_OUT.value, Image.fromarray(grid(pixels, _COLUMNS.value)))
  for sample in samples:
    print(f"{sample['id']}: {sample['text']!r}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=run_flags.parse_flags)
