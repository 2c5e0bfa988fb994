"""The demo VAE's round trip: what survives encoding and decoding, for a VAE trained afresh.

  python -m benchmarks.demo_vae --workdir=runs/demo [--steps=4800 --lr=2e-3 --crop=16 --seed=0]

Trains the demo's VAE (configs/demo.py; flags override its `demo.vae_*` fields) on a demo work
directory's training images and masks, as `launch/demo.py` does, then reports on one JSON line:
the mask IoU of the held-out masks' round trip (foreground = positive mask logit, as one-step
segmentation reads it), the named-colour recall / precision of the round trip of the first
`--scenes` caption scenes (evaluation/colours.py), the mean RGB distance of each palette
colour's pixels after the round trip, and the training time. The generated images of the demo
cannot do better than this round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from configs.demo import get_config
from genmask_jax.data import records, synthetic
from genmask_jax.data.masks import mask_to_image
from genmask_jax.evaluation import colours, metrics
from genmask_jax.models.genmask import Models
from genmask_jax.training import vae_training
from launch.demo import training_images, vae_round_trip


def main() -> None:
  demo = get_config().demo
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True, help="a demo work directory (its data/)")
  parser.add_argument("--steps", type=int, default=demo.vae_steps)
  parser.add_argument("--lr", type=float, default=demo.vae_lr)
  parser.add_argument("--crop", type=int, default=demo.vae_crop)
  parser.add_argument("--batch_size", type=int, default=demo.vae_batch_size)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scenes", type=int, default=256, help="caption scenes for the colours")
  args = parser.parse_args()
  data = os.path.join(args.workdir, "data")

  models = Models.from_config(get_config())
  images, mask_images = training_images(os.path.join(data, "train"))
  start = time.time()
  params, losses = vae_training.train_vae(
    models.vae,
    np.concatenate([images, mask_images]),
    steps=args.steps,
    batch_size=args.batch_size,
    lr=args.lr,
    seed=args.seed,
    crop=args.crop,
    log_every=args.steps,
  )
  seconds = time.time() - start

  heldout = records.RecordReader(os.path.join(data, "heldout"))
  masks = np.stack([records.decode_mask(heldout[i]) for i in range(len(heldout))])
  mask_logits = jax.jit(lambda p, x: models.vae_mask_logits(p, models.encode(p, x)[:, 0]))
  inter, union = metrics.intersection_union(
    np.asarray(mask_logits(params, mask_to_image(masks))) > 0, masks
  )

  captions = records.RecordReader(os.path.join(data, "gen"))
  n = min(args.scenes, len(captions))
  scenes = np.stack([records.decode_image(captions[i]) for i in range(n)])
  round_trip = vae_round_trip(models, params, scenes)
  scores = colours.colour_scores(
    round_trip, [captions[i]["text"] for i in range(n)], synthetic.COLORS
  )
  distance = {
    name: float(np.linalg.norm(round_trip[pixels] - np.float32(rgb), axis=-1).mean())
    for name, rgb in synthetic.COLORS.items()
    if (pixels := np.all(scenes == np.uint8(rgb), axis=-1)).any()
  }
  print(
    json.dumps(
      dict(
        vars(args),
        train_seconds=round(seconds, 1),
        final_mse=float(np.mean(losses[-100:])),
        mask_iou=float(np.mean(inter / np.maximum(union, 1))),
        colour_recall=scores["recall"],
        colour_precision=scores["precision"],
        colour_rgb_distance={k: round(v, 1) for k, v in distance.items()},
      )
    )
  )


if __name__ == "__main__":
  main()
