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

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from configs.demo import get_config
from genmask_jax.data import records, synthetic
from genmask_jax.data.masks import mask_to_image
from genmask_jax.evaluation import colours, metrics
from genmask_jax.models.genmask import Models
from genmask_jax.training import vae_training

_DEMO = get_config().demo  # The demo VAE's settings: the flags' defaults.
FLAGS = (
  "workdir", "steps", "lr", "crop", "batch_size", "seed", "scenes"
)  # fmt: skip
flags.DEFINE_string("workdir", None, "A demo work directory (its data/).", required=True)
flags.DEFINE_integer("steps", _DEMO.vae_steps, "VAE training steps.")
flags.DEFINE_float("lr", _DEMO.vae_lr, "Learning rate.")
flags.DEFINE_integer("crop", _DEMO.vae_crop, "Side of the random training windows.")
flags.DEFINE_integer("batch_size", _DEMO.vae_batch_size, "Windows per step.")
flags.DEFINE_integer("seed", 0, "Initialization and data order.")
flags.DEFINE_integer("scenes", 256, "Caption scenes for the colours.")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  data = os.path.join(args.workdir, "data")

  models = Models.from_config(get_config())
  images, mask_images = vae_training.training_images(os.path.join(data, "train"))
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
  round_trip = vae_training.round_trip(models.vae, params, scenes)
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
        {name: args[name].value for name in FLAGS},
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
  app.run(main)
