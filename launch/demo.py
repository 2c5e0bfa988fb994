r"""The CPU demo: every stage of the real GenMask pipeline at toy scale, no downloads.

  python -m launch.demo --workdir=runs/demo [--config=configs/demo.py] [--config.x=y ...]

1. generates the synthetic referring-segmentation and captioning data (launch/prepare_data.py);
2. builds a tiny random Qwen2.5-VL and precomputes its features (launch/precompute_vlm.py);
3. trains a small WAN-layout VAE by reconstruction, freezes it and stores the training
   latents (launch/precompute_latents.py);
4. trains a small GenMask DiT with the paper's recipe (genmask_jax.training.train);
5. evaluates one-step segmentation on held-out expressions (and, to show fit, on training
   scenes) against two baselines and generates images from held-out captions;
6. prints a summary; PNGs, results and TensorBoard logs stay under --workdir.
Each stage reuses what a previous run left, so re-running continues instead of starting over.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time

import cv2
import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from genmask_jax import config_check
from genmask_jax.conversion import weights
from genmask_jax.data import encode_latents, preprocess, records, synthetic
from genmask_jax.data.features import FeatureReader
from genmask_jax.data.masks import mask_to_image
from genmask_jax.data.store import is_complete
from genmask_jax.evaluation import colours, evaluate, metrics
from genmask_jax.inference import model as inference
from genmask_jax.inference import run
from genmask_jax.models.genmask import Models
from genmask_jax.runtime import host_memory, log_filter, sharding
from genmask_jax.training import train, vae_training
from genmask_jax.vlm.tiny_qwen import save_tiny_qwen

CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.")
WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Everything the demo writes.")

HELDOUT_CAPTIONS_SEED = 1  # Generation scenes the DiT never saw.


def run_module(*args: str) -> None:
  """Runs a project entry point (`python -m ...`) as its user would."""
  subprocess.run([sys.executable, "-m", *args], check=True)


def make_data(demo, data_dir: str) -> None:
  if not is_complete(os.path.join(data_dir, "gen")):
    run_module(
        "launch.prepare_data", "synthetic", f"--output={data_dir}", "--overwrite",
        f"--num_train={demo.num_train}", "--num_val=0", f"--num_heldout={demo.num_heldout}",
        f"--num_gen={demo.num_gen}", f"--image_size={demo.image_size}",
    )  # fmt: skip
  extra = {
    "gen_heldout": synthetic.samples(
      "gen", demo.num_generate, seed=HELDOUT_CAPTIONS_SEED, image_size=demo.image_size
    ),
    # The first training samples again (sample i depends only on the split and i).
    "train_eval": synthetic.samples("train", demo.num_eval_train, image_size=demo.image_size),
  }
  for name, samples in extra.items():
    if not is_complete(os.path.join(data_dir, name)):
      with records.RecordWriter(os.path.join(data_dir, name), 1000, overwrite=True) as writer:
        for sample in samples:
          writer.write(sample)
  sizes = dict(
    train="num_train", heldout="num_heldout", gen="num_gen", gen_heldout="num_generate",
    train_eval="num_eval_train",
  )  # fmt: skip
  for name, field in sizes.items():  # A re-run reuses the stores: they must fit the config.
    found = len(records.RecordReader(os.path.join(data_dir, name)))
    if found != demo[field]:
      raise ValueError(
        f"{os.path.join(data_dir, name)} holds {found} samples where config.demo.{field} is "
        f"{demo[field]}: use another --workdir, or delete that store and its features"
      )


def make_features(vlm_dir: str, data_dir: str, features_dir: str, splits, image_size: int) -> None:
  if not os.path.exists(os.path.join(vlm_dir, "config.json")):
    save_tiny_qwen(vlm_dir, seed=0)
  todo = [s for s in splits if not is_complete(os.path.join(features_dir, s))]
  if todo:  # One process (one model load) for every store.
    run_module(
        "launch.precompute_vlm", f"--samples={','.join(os.path.join(data_dir, s) for s in todo)}",
        f"--checkpoint={vlm_dir}", f"--out={','.join(os.path.join(features_dir, s) for s in todo)}",
        "--batch_size=64", "--store_dtype=float16",
        # Every image the VLM sees has the scenes' size, so a user's image of any size gives
        # the token layout the DiT trained on (the run records this policy).
        f"--image_resize={image_size}",
    )  # fmt: skip


def training_images(records_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and masks of a segmentation store as [-1, 1] arrays (N, H, W, 3)."""
  reader = records.RecordReader(records_dir)
  images = np.stack([records.decode_image(reader[i]) for i in range(len(reader))])
  masks = np.stack([records.decode_mask(reader[i]) for i in range(len(reader))])
  return images.astype(np.float32) / 127.5 - 1, np.asarray(mask_to_image(masks))


def make_vae(config, vae_dir: str, records_dir: str) -> dict:
  """Trains the demo VAE on images and mask images once; returns its latent statistics."""
  if os.path.exists(os.path.join(vae_dir, weights.RECORD)):
    return weights.read_record(vae_dir)["latent_statistics"]
  demo = config.demo
  images, mask_images = training_images(records_dir)
  both = np.concatenate([images, mask_images])
  vae = Models.from_config(config).vae
  start = time.time()
  params, losses = vae_training.train_vae(
    vae,
    both,
    steps=demo.vae_steps,
    batch_size=demo.vae_batch_size,
    lr=demo.vae_lr,
    seed=0,
    crop=demo.vae_crop,
  )
  every = max(len(both) // demo.vae_statistics_samples, 1)  # A stride: images and masks alike.
  mean, std = vae_training.latent_statistics(vae, params, both[::every])
  logging.info("VAE: %d steps in %.0f s, final loss %.4f", demo.vae_steps, time.time() - start,
               np.mean(losses[-20:]))  # fmt: skip
  weights.save(vae_dir, "vae", params)
  statistics = {"mean": mean, "std": std}
  weights.write_record(vae_dir, {"latent_statistics": statistics, "losses": losses})
  return statistics


def foreground(image: np.ndarray) -> np.ndarray:
  """Shape pixels: everything that differs from the (uniform, most frequent) background."""
  colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
  return np.any(image != colors[np.argmax(counts)], axis=-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
  if count <= 1:
    return mask
  return labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])


def baselines(records_dir: str) -> dict[str, dict[str, float]]:
  """mIoU of predicting every shape, and of predicting the largest shape, per sample."""
  reader = records.RecordReader(records_dir)
  rules = {"every shape": foreground, "largest shape": lambda x: largest_component(foreground(x))}
  results = {}
  for name, rule in rules.items():
    pairs = [
      metrics.intersection_union(rule(records.decode_image(s)), records.decode_mask(s))
      for s in map(reader.__getitem__, range(len(reader)))
    ]
    results[name] = metrics.IoUSums.of_samples(*map(np.array, zip(*pairs, strict=True))).results()
  return results


def generate_images(
  config, models, named_params: dict, vae_params, captions_dir, features_dir
) -> dict[str, np.ndarray]:
  """{name: (N, R, R, 3) uint8 images} generated by each of `named_params` from the captions of
  a generation store."""
  reader, features = records.RecordReader(captions_dir), FeatureReader(features_dir)
  padded = [
    preprocess.pad_text(features.get(i), config.data.text_len, "float32", i) for i in reader.ids()
  ]
  text, text_mask = (np.stack(x) for x in zip(*padded, strict=True))
  generate = inference.generator(models, config, config.data.generation.resolution)  # One compile.
  guidance = config.generate.guidance_scale
  return {
    name: to_uint8(generate(params, vae_params, jax.random.key(0), text, text_mask, guidance))
    for name, params in named_params.items()
  }


def to_uint8(images: jax.Array) -> np.ndarray:
  return ((np.asarray(images) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def real_scenes(captions_dir: str) -> np.ndarray:
  reader = records.RecordReader(captions_dir)
  return np.stack([records.decode_image(reader[i]) for i in range(len(reader))])


def vae_round_trip(models, vae_params, images: np.ndarray) -> np.ndarray:
  """uint8 images encoded and decoded by the frozen VAE: the best a generated image can be."""
  round_trip = jax.jit(lambda v, x: models.decode(v, models.encode(v, x)[:, 0]))
  return to_uint8(round_trip(vae_params, images.astype(np.float32) / 127.5 - 1))


def generation_scores(images: dict[str, np.ndarray], captions_dir: str) -> dict[str, dict]:
  """Named-colour recall / precision (evaluation/colours.py) of each set of images against the
  captions of `captions_dir`, in order."""
  reader = records.RecordReader(captions_dir)
  captions = [reader[i]["text"] for i in range(len(reader))]
  return {name: colours.colour_scores(x, captions, synthetic.COLORS) for name, x in images.items()}


def save_grid(generated: np.ndarray, real: np.ndarray, out_path: str, columns: int = 8) -> None:
  """The first `columns` generated images above their real scenes, as one PNG."""
  n = min(columns, len(generated))
  grid = np.concatenate([np.concatenate(list(generated[:n]), 1), np.concatenate(real[:n], 1)], 0)
  Image.fromarray(grid).save(out_path)


def prepare(config, workdir: str) -> dict[str, dict[str, str]]:
  """Stages 1-3 (data, VLM features, the frozen VAE); points `config` at their outputs and
  returns the sample / feature stores by split."""
  data_dir, features_dir = os.path.join(workdir, "data"), os.path.join(workdir, "features")
  make_data(config.demo, data_dir)
  splits = ("train", "heldout", "gen", "gen_heldout", "train_eval")
  vlm_dir = os.path.join(workdir, "tiny_qwen")
  make_features(vlm_dir, data_dir, features_dir, splits, config.demo.image_size)
  store = {
    s: {"records": os.path.join(data_dir, s), "features": os.path.join(features_dir, s)}
    for s in splits
  }
  vae_dir = os.path.join(workdir, "vae")
  new_vae = not os.path.exists(os.path.join(vae_dir, weights.RECORD))
  statistics = make_vae(config, vae_dir, store["train"]["records"])
  latents_dir = functools.partial(os.path.join, workdir, "latents")
  if new_vae:  # Latents an earlier VAE left would be refused.
    shutil.rmtree(latents_dir(), ignore_errors=True)
  with config.unlocked():
    config.vae.latents_mean = tuple(statistics["mean"])
    config.vae.latents_std = tuple(statistics["std"])
    config.init.vae_weights = vae_dir
    config.data.segmentation.sources = [dict(store["train"], latents=latents_dir("train"))]
    config.data.generation.sources = [dict(store["gen"], latents=latents_dir("gen"))]
    config.eval.splits = [
      dict(name="heldout", **store["heldout"]),
      dict(name="train", **store["train_eval"]),
    ]
  encode_latents.precompute(config, batch_size=64)
  return store


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  config, workdir = CONFIG.value, os.path.abspath(WORKDIR.value)
  config_check.validate(config, "train")  # Its stores are made below: model and batch only.
  start = time.time()
  store = prepare(config, workdir)

  run_dir = os.path.join(workdir, "genmask")
  train.train(config, run_dir)

  # The run as predict, generate and --mode=eval open it: its own record, nothing from here.
  opened = run.open_run(run_dir)
  models, vae_params = opened.models, opened.vae_params
  with opened.activate():
    untrained = sharding.strip_axis_names(jax.jit(models.init_params)(jax.random.key(config.seed)))
    at_init = evaluate.evaluate_params(
      models, untrained, vae_params, config, opened.mesh, os.path.join(workdir, "eval_init")
    )
    trained = evaluate.evaluate_run(opened, os.path.join(workdir, "eval"))
    captions_dir = store["gen_heldout"]["records"]
    images = generate_images(
      config,
      models,
      {"GenMask (trained)": opened.params, "GenMask (initialization)": untrained},
      vae_params,
      captions_dir,
      store["gen_heldout"]["features"],
    )
    real = real_scenes(captions_dir)
    # Real scenes score 1 / 1; their VAE round trip is the ceiling a generated image can reach.
    images.update({"real scenes": real, "VAE round trip": vae_round_trip(models, vae_params, real)})
  grid_path = os.path.join(workdir, "generated.png")
  save_grid(images["GenMask (trained)"], real, grid_path)
  generation = generation_scores(images, captions_dir)

  rows = {"GenMask (trained)": trained, "GenMask (initialization)": at_init}
  for split in config.eval.splits:
    for name, result in baselines(split["records"]).items():
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
