r"""The CPU demo: every stage of the real GenMask pipeline at toy scale, no downloads.

  python -m launch.demo --workdir=runs/demo [--config=configs/demo.py] [--config.x=y ...]

1-3. makes the synthetic data, a tiny random Qwen2.5-VL's features, a small VAE trained from
   scratch and its latents (genmask_jax/demo.py, through launch/prepare_data.py,
   launch/precompute_vlm.py and the latent-precompute stage);
4. trains a small GenMask DiT with the paper's recipe (genmask_jax.training.train);
5. opens the run as a user does (`GenMask`), evaluates one-step segmentation on held-out
   expressions (and, to show fit, on training scenes) against two baselines and the untrained
   model, and generates images from held-out captions;
6. prints a summary; PNGs, results and TensorBoard logs stay under --workdir.
Each stage reuses what a previous run left, so re-running continues instead of starting over.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from genmask_jax import GenMask, config_check, demo
from genmask_jax.data import records, synthetic
from genmask_jax.evaluation import baselines, colours
from genmask_jax.runtime import host_memory, log_filter, sharding
from genmask_jax.training import train, vae_training

CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.")
WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Everything the demo writes.")


def save_grid(generated: np.ndarray, real: np.ndarray, out_path: str, columns: int = 8) -> None:
  """The first `columns` generated images above their real scenes, as one PNG."""
  n = min(columns, len(generated))
  grid = np.concatenate([np.concatenate(list(generated[:n]), 1), np.concatenate(real[:n], 1)], 0)
  Image.fromarray(grid).save(out_path)


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  config, workdir = CONFIG.value, os.path.abspath(WORKDIR.value)
  config_check.validate(config, "train")  # Its stores are made below: model and batch only.
  start = time.time()
  store = demo.prepare(config, workdir)

  run_dir = os.path.join(workdir, "genmask")
  train.train(config, run_dir)

  # The run as predict, generate and --mode=eval open it: its own record, nothing from here.
  trained_model = GenMask.open(run_dir)
  with trained_model.activate() as loaded:
    init = jax.jit(loaded.models.init_params)(jax.random.key(config.seed))
  untrained_model = trained_model.with_params(sharding.strip_axis_names(init))
  at_init = untrained_model.evaluate(out_dir=os.path.join(workdir, "eval_init"))
  trained = trained_model.evaluate(out_dir=os.path.join(workdir, "eval"))
  captions = store["gen_heldout"]
  reader = records.RecordReader(captions["records"])
  samples = [reader[i] for i in range(len(reader))]
  images = {
    name: m.generate_samples(samples, features=captions["features"], batch_size=len(samples))
    for name, m in (
      ("GenMask (trained)", trained_model),
      ("GenMask (initialization)", untrained_model),
    )
  }
  real = np.stack([records.decode_image(s) for s in samples])
  # Real scenes score 1 / 1; their VAE round trip is the ceiling a generated image can reach.
  round_trip = vae_training.round_trip(loaded.models.vae, loaded.vae_params, real)
  images.update({"real scenes": real, "VAE round trip": round_trip})
  grid_path = os.path.join(workdir, "generated.png")
  save_grid(images["GenMask (trained)"], real, grid_path)
  generation = {
    name: colours.colour_scores(x, [s["text"] for s in samples], synthetic.COLORS)
    for name, x in images.items()
  }

  rows = {"GenMask (trained)": trained, "GenMask (initialization)": at_init}
  for split in config.eval.splits:
    for name, result in baselines.baselines(split["records"]).items():
      rows.setdefault(name, {})[split["name"]] = result
  summary = {
    name: {split: {k: r[k] for k in ("gIoU", "cIoU", "Prec@0.5")} for split, r in row.items()}
    for name, row in rows.items()
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(dict(summary, generation=generation), f, indent=2)
  print(
    f"\nGenMask demo: held-out expressions ({int(trained['heldout']['samples'])} samples, "
    f"unseen color-kind pairs); mIoU on training scenes ({int(trained['train']['samples'])}) "
    "shows fit"
  )
  print(f"{'':26s} {'mIoU (gIoU)':>12s} {'oIoU (cIoU)':>12s} {'Prec@0.5':>9s} {'train mIoU':>11s}")
  for name, r in summary.items():
    held = r["heldout"]
    print(
      f"{name:26s} {held['gIoU']:12.3f} {held['cIoU']:12.3f} {held['Prec@0.5']:9.3f} "
      f"{r['train']['gIoU']:11.3f}"
    )
  print(
    f"\nimages from {len(real)} held-out captions: colours named in "
    "the caption that the image shows (recall), colours shown that were named (precision)"
  )
  print(f"{'':26s} {'recall':>8s} {'precision':>10s}")
  for name, r in generation.items():
    print(f"{name:26s} {r['recall']:8.3f} {r['precision']:10.3f}")
  print(f"generated images (top row; real scenes below): {grid_path}")
  print(f"overlays: {os.path.join(workdir, 'eval', 'heldout_overlays.png')}")
  print(f"TensorBoard: tensorboard --logdir={os.path.join(run_dir, 'tensorboard')}")
  print(f"workdir: {workdir}  ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()
  app.run(main)
