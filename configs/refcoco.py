"""The paper's training mix and evaluation splits: `--config=configs/refcoco.py:SIZE[,OPTION...]`.

SIZE: 1.3b (the paper's recipe, configs/genmask.py) | 14b (the same on WAN-2.1 14B) | trial
(seconds per step on a CPU, with the tiny Qwen2.5-VL that
`python -m launch.tiny_qwen --out=tiny_qwen` builds).
OPTIONs:
  root=PATH  the stores and the converted weights live under PATH (a folder or gs://bucket/dir)
             instead of the working directory, e.g. configs/refcoco.py:1.3b,root=gs://b/genmask;
  latents    training reads the VAE latents that launch/precompute_latents.py writes.

Paths follow the README's workflow: sample stores PATH/data/<name>/<split> (launch/prepare_data.py),
feature stores PATH/features/<name>_<split> (launch/precompute_vlm.py), latent stores
PATH/latents/<name>_<split>, WAN-2.1 weights PATH/checkpoints/wan21_init (launch/convert_wan.py).
Training: RefCOCO / RefCOCO+ / RefCOCOg train (unc / unc / umd), ADE20K, COCO-Stuff and
PASCAL-Part for segmentation, text-image pairs (`prepare_data text-image --name=t2i`) for
generation. Evaluation: RefCOCO and RefCOCO+ val / testA / testB, RefCOCOg val / test, ReasonSeg
val / test (reasoning-mode features, short and long queries apart). The trial has no semantic
sets. To train on other stores, copy this file and edit the lists below.
"""

from __future__ import annotations

import ml_collections

from configs.genmask import get_config as genmask_config

SEGMENTATION = [  # (store name, split)
  ("refcoco_unc", "train"),
  ("refcoco+_unc", "train"),
  ("refcocog_umd", "train"),
  ("ade20k", "training"),
  ("cocostuff", "train2017"),
  ("pascal_part", "train"),
]
SEMANTIC_SETS = ("ade20k", "cocostuff", "pascal_part")  # Not in the trial.
CLASSES_PER_USE = 3  # LISA: a semantic image shows up to 3 of its classes each time it is used.
GENERATION = [("t2i", "train")]
EVALUATION = [
  *(("refcoco_unc", s) for s in ("val", "testA", "testB")),
  *(("refcoco+_unc", s) for s in ("val", "testA", "testB")),
  *(("refcocog_umd", s) for s in ("val", "test")),
  *(("reasonseg", s) for s in ("val", "test")),
]
REASONING = ("reasonseg",)  # Features from `precompute_vlm --reasoning`.
SIZES = ("1.3b", "14b", "trial")


def _options(arg: str | None) -> tuple[str, str, bool]:
  """(size, root, latents) of the config argument."""
  size, *options = (arg or "1.3b").split(",")
  if size not in SIZES:
    raise ValueError(f"configs/refcoco.py: size {size!r} unknown; choose from {SIZES}")
  root, latents = "", False
  for option in options:
    if option == "latents":
      latents = True
    elif option.startswith("root="):
      root = option.removeprefix("root=").rstrip("/")
    else:
      raise ValueError(f"configs/refcoco.py: option {option!r} unknown; root=PATH or latents")
  return size, root, latents


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, root, latents = _options(arg)
  under = (root + "/") if root else ""

  def source(name: str, split: str) -> dict:
    spec = dict(records=f"{under}data/{name}/{split}", features=f"{under}features/{name}_{split}")
    if latents:
      spec["latents"] = f"{under}latents/{name}_{split}"
    if name in SEMANTIC_SETS:
      spec["classes_per_use"] = CLASSES_PER_USE
    return spec

  config = genmask_config("tiny" if size == "trial" else size)
  checkpoint = f"{under}checkpoints/wan21_init"
  config.init = dict(weights=checkpoint, vae_weights=checkpoint)
  segmentation = [(n, s) for n, s in SEGMENTATION if size != "trial" or n not in SEMANTIC_SETS]
  config.data.segmentation.sources = [source(n, s) for n, s in segmentation]
  config.data.generation.sources = [source(n, s) for n, s in GENERATION]
  config.eval.splits = [
    dict(
      name=f"{name}_{split}",
      records=f"{under}data/{name}/{split}",
      features=f"{under}features/{name}_{split}",
      reasoning=name in REASONING,
      breakdown="is_sentence" if name in REASONING else "",
    )
    for name, split in EVALUATION
  ]
  if size == "trial":
    config.dit.text_dim = 64  # The tiny Qwen2.5-VL's width.
    config.data.encoder_model_id = "tiny_qwen"  # Its folder's name.
    for task in ("segmentation", "generation"):
      config.data[task].resolution = 64
      config.data[task].global_batch_size = 2
    config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.checkpoint.every = 2
    config.log_every = 1
    config.eval.update(batch_size=2, num_overlays=2, overlay_tile=64)
  return config
