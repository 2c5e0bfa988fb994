r"""Generates images from captions with a trained GenMask model; writes them as one grid PNG.

  python -m launch.generate --workdir=runs/genmask \
      --vlm=Qwen2.5-VL-7B-Instruct --prompt="a red bus on a bridge" --prompt="two cats" \
      --steps=50 --shift=5 --guidance=5 --seed=0 --resolution=512 --out=generated.png

Captions come from --prompt and from the generation samples --sample_id of --records; they are
encoded by the VLM in-process (--vlm, the caption alone as in launch/precompute_vlm.py) or read
from the store's feature store (--features). Euler sampling with classifier-free guidance;
--steps, --shift and --guidance default to config.generate. The grid holds the images in order,
--columns per row. The same queries, seed and batch size give the same images. The model is the
latest checkpoint under --workdir with the run's own config (genmask_jax/inference/run.py);
--config and --config.x=y apply on top.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import app, flags
from PIL import Image

from genmask_jax import config_check
from genmask_jax.inference import queries, run
from genmask_jax.runtime import fileio, log_filter
from launch import queries as query_flags

flags.adopt_module_key_flags(query_flags)  # --help lists the shared flags too.
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
_COLUMNS = flags.DEFINE_integer("columns", 4, "Images per grid row.")
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
  spec = query_flags.run_config(argv)
  config = spec.config
  config_check.validate(config, "model")
  resolution = _RESOLUTION.value or config.data.generation.resolution
  multiple = config_check.image_multiple(config)
  if resolution % multiple:
    raise app.UsageError(
      f"--resolution {resolution} is not a multiple of {multiple} (the VAE's stride x the DiT's "
      "patch)"
    )
  if _COLUMNS.value < 1:
    raise app.UsageError(f"--columns must be positive, got {_COLUMNS.value}")
  if _STEPS.value is not None:
    config.generate.num_steps = _STEPS.value
  if _SHIFT.value is not None:
    config.generate.shift = _SHIFT.value
  guidance = config.generate.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value

  samples = [queries.generation_record(i, p) for i, p in enumerate(_PROMPT.value)]
  samples += query_flags.store_records("generation")
  hidden = query_flags.text_features(spec, samples)
  examples = queries.examples(spec, samples, hidden, resolution)
  batch_size = query_flags.BATCH_SIZE.value
  pixels = queries.generate(run.load(spec), examples, resolution, _SEED.value, guidance, batch_size)
  fileio.makedirs(os.path.dirname(_OUT.value) or ".")
  fileio.save_image(_OUT.value, Image.fromarray(grid(pixels, _COLUMNS.value)))
  for sample in samples:
    print(f"{sample['id']}: {sample['text']!r}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=run.parse_flags)
