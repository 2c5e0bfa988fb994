"""The CPU demo's inputs, made once under its work directory: stages 1-3 of launch/demo.py.

1. the synthetic referring-segmentation and captioning set (launch/prepare_data.py), plus the
   held-out captions the demo generates from and the training scenes it evaluates fit on;
2. a tiny random Qwen2.5-VL and its features of every store (launch/precompute_vlm.py);
3. a small WAN-layout VAE trained by reconstruction, frozen with its latent statistics, and the
   training latents it encodes (training/precompute_latents.py).
`prepare` makes what is missing and points a demo config at it; the demo, benchmarks/ablations.py
and benchmarks/demo_step.py train on the result.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
from absl import logging

from genmask_jax.conversion import weights
from genmask_jax.data import records, synthetic
from genmask_jax.data.store import is_complete
from genmask_jax.models.genmask import Models
from genmask_jax.training import precompute_latents, vae_training
from genmask_jax.vlm.tiny_qwen import save_tiny_qwen

HELDOUT_CAPTIONS_SEED = 1  # Generation scenes the DiT never saw.
SPLITS = ("train", "heldout", "gen", "gen_heldout", "train_eval")


def run_module(*args: str) -> None:
  """Runs a project entry point (`python -m ...`) as its user would."""
  subprocess.run([sys.executable, "-m", *args], check=True)


def make_data(demo: ml_collections.ConfigDict, data_dir: str) -> None:
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


def make_features(
  vlm_dir: str, data_dir: str, features_dir: str, splits: tuple[str, ...], image_size: int
) -> None:
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


def make_vae(config: ml_collections.ConfigDict, vae_dir: str, records_dir: str) -> dict:
  """Trains the demo VAE on images and mask images once; returns its latent statistics."""
  if os.path.exists(os.path.join(vae_dir, weights.RECORD)):
    return weights.read_record(vae_dir)["latent_statistics"]
  demo = config.demo
  images, mask_images = vae_training.training_images(records_dir)
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


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, str]]:
  """Stages 1-3 (data, VLM features, the frozen VAE); points `config` at their outputs and
  returns the sample / feature stores by split."""
  data_dir, features_dir = os.path.join(workdir, "data"), os.path.join(workdir, "features")
  make_data(config.demo, data_dir)
  splits = SPLITS
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
  precompute_latents.precompute(config, batch_size=64)
  return store
