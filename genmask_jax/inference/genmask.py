"""A trained run as one object: open its directory, then segment, generate and evaluate.

  model = GenMask.open("runs/demo/genmask", vlm="runs/demo/tiny_qwen")
  masks = model.segment(["street.jpg"], ["the red car"])   # bool (H, W) at each image's size
  images = model.generate(["a red bus on a bridge"], seed=0)  # uint8 (N, R, R, 3)
  results = model.evaluate("heldout")                       # metrics of config.eval.splits

`open` reads the run record (runs/record.py): the run's config, with overrides on top (a change
to a field that shapes the model is refused naming it), the frozen VAE's identity and the VLM
settings of its features. The weights load on first use, after the in-process VLM has encoded
the texts and handed the accelerator back: the latest checkpoint (runs/model.py), with a frozen
VAE whose fingerprint must be the run's. A query is a sample record (data/records.py: a
store's, or a caller's image without ground truth) with its text features (a feature store's,
or the in-process VLM's: vlm/in_process.py), preprocessed by data/preprocess.py as training and
evaluation do. Masks are exactly those evaluation scores: one-step segmentation of the resized
and padded image, logits cropped to it, resized back to the image's size and thresholded at 0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from genmask_jax import config_check
from genmask_jax.data import preprocess, records
from genmask_jax.data.features import FeatureError, FeatureMeta, FeatureReader, check_encoder
from genmask_jax.data.records import ImageLike, Sample
from genmask_jax.data.resize import undo_resize
from genmask_jax.evaluation import evaluate
from genmask_jax.models.vae import spatial_stride
from genmask_jax.runs import model, record
from genmask_jax.runs.model import Loaded
from genmask_jax.runs.record import RunError
from genmask_jax.runtime import sharding
from genmask_jax.vlm import prompts
from genmask_jax.vlm.in_process import VLM


class GenMask:
  """A trained GenMask run: `GenMask.open(workdir)`, then `segment`, `generate`, `evaluate`."""

  def __init__(
    self,
    workdir: str,
    config: ml_collections.ConfigDict,
    run_record: dict | None,
    vlm: VLM | None = None,
    devices: Sequence[jax.Device] | None = None,
  ):
    """Use `GenMask.open`: it resolves and checks the config."""
    self.workdir, self.config, self.record = workdir, config, run_record
    self.vlm, self._devices = vlm, devices
    self._loaded: Loaded | None = None
    self._programs: dict = {}

  @classmethod
  def open(
    cls,
    workdir: str,
    *,
    overrides: Sequence[str] = (),
    config: ml_collections.ConfigDict | None = None,
    vlm: str | VLM | None = None,
    devices: Sequence[jax.Device] | None = None,
  ) -> GenMask:
    """The run under `workdir`: its own config unless `config` is given, `overrides`
    (`field=value`, or `--config.field=value` as on a command line) on top. `vlm` encodes
    texts in-process: a Qwen2.5-VL directory or a `VLM`. A folder with no run (converted weights)
    needs `config`."""
    run_record = record.read_record(workdir)
    if run_record is None and config is None:
      raise RunError(
        f"run {workdir}: no {record.RUN_FILE} and no checkpoints; give the training config "
        "(--config) or the workdir of a training run"
      )
    base = config if config is not None else record.config_from_dict(run_record["config"])
    resolved = record.apply_overrides(base, overrides)
    config_check.validate(resolved, "model")
    if run_record is not None:
      record.check_config(run_record, resolved, workdir)
    return cls(workdir, resolved, run_record, VLM(vlm) if isinstance(vlm, str) else vlm, devices)

  @property
  def vae_identity(self) -> dict | None:
    """Where the run's frozen VAE comes from and its fingerprint (None without a run)."""
    return None if self.record is None else self.record["vae"]

  @property
  def vlm_settings(self) -> dict:
    """What the run's text features were computed with (runs/record.py); converted weights
    without a run read the training config's encoder and the default image policy."""
    if self.record is not None:
      return self.record["vlm"]
    data = self.config.data
    return {
      "encoder_model_id": data.encoder_model_id,
      "prompt_template": data.prompt_template,
      "image_policy": None,
      "store_dtype": None,
    }

  @property
  def step(self) -> int | None:
    """The training step of the weights in use; None for converted weights."""
    return self.loaded.step if self._loaded else model.latest_step(self.workdir)

  @property
  def loaded(self) -> Loaded:
    """The model in memory, loaded on first use and checked against the run's VAE."""
    if self._loaded is None:
      self._loaded = self._load()
    return self._loaded

  def _load(self) -> Loaded:
    loaded = model.load(self.config, self.workdir, self._devices)
    if self.record is not None:
      fingerprint = model.vae_fingerprint(loaded.models.vae, loaded.vae_params)
      record.check_vae(self.record, self.config, fingerprint, self.workdir)
      if not self.config.init.vae_weights:
        logging.warning("run %s: its frozen VAE is %s, as in training", self.workdir,
                        model.describe_vae(self.record["vae"]))  # fmt: skip
    return loaded

  def with_params(self, params: Any) -> GenMask:
    """The same run with other trained parameters (e.g. its initialization, as a baseline);
    compiled programs are shared."""
    other = GenMask(self.workdir, self.config, self.record, self.vlm, self._devices)
    other._loaded = dataclasses.replace(self.loaded, params=params, step=None)
    other._programs = self._programs
    return other

  @contextlib.contextmanager
  def activate(self) -> Iterator[Loaded]:
    """The run's mesh and sharding rules, which its jitted programs run under."""
    loaded = self.loaded
    with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
      yield loaded

  def _program(self, build: Any, config: ml_collections.ConfigDict, *key: Any):
    """`build(models, config)` (runs/model.py), built once per `key` (the settings it reads), on a
    copy of the config: a later change to `self.config` gets a program of its own."""
    key = (build.__name__, *key)
    if key not in self._programs:
      self._programs[key] = build(self.loaded.models, copy.deepcopy(config))
    return self._programs[key]

  def features(
    self, samples: Sequence[Sample], features: str | None = None, reasoning: bool = False
  ) -> list[np.ndarray]:
    """(L, D) text hidden states of the queries: those stored under their ids in the feature
    store `features`, or computed by the run's in-process VLM as its stores were; `reasoning`:
    reasoning mode's prompt template (as evaluation's reasoning splits read)."""
    settings = self.vlm_settings
    template = self.config.data.prompt_template
    expected = FeatureMeta(
      model_id=self.config.data.encoder_model_id,
      prompt_template=prompts.prompt_template(reasoning=True) if reasoning else template,
      dtype=settings["store_dtype"] or "float32",  # Mixed or unknown: not rounded.
      hidden_size=self.config.dit.text_dim,
      image_policy=settings["image_policy"],
    )
    if features is not None:
      reader = FeatureReader(features)
      check_encoder(reader.meta, expected, features)
      return [reader.get(sample["id"]) for sample in samples]
    if self.vlm is None:
      raise ValueError(
        f"run {self.workdir}: texts need an encoder: open the run with vlm= (a Qwen2.5-VL "
        "directory) or give a feature store of the samples"
      )
    return self.vlm.features(samples, expected, reasoning)

  def _examples(
    self, samples: Sequence[Sample], hidden: Sequence[np.ndarray], resolution: int
  ) -> list[dict]:
    """The model inputs of the queries, preprocessed as the training pipeline does."""
    data = self.config.data
    out = []
    for sample, h in zip(samples, hidden, strict=True):
      try:
        element = {"sample": sample, "hidden": h}
        out.append(
          preprocess.example(
            element, resolution=resolution, text_len=data.text_len, text_dtype=data.text_dtype
          )
        )
      except FeatureError as e:  # At inference text_len is the trained model's: the text must fit.
        raise FeatureError(
          f"{e}. The run's model reads at most {data.text_len} tokens (image tokens included): "
          "shorten the text"
        ) from e
    return out

  def segment(
    self,
    images: Sequence[ImageLike],
    texts: Sequence[str],
    *,
    reasoning: bool = False,
    batch_size: int = 8,
  ) -> list[np.ndarray]:
    """Boolean masks at each image's own size for images (JPEG / PNG files, (H, W, 3) uint8
    arrays or PIL images) and what to segment in each; `reasoning`: the VLM first rewrites
    each text into an explicit target (ReasonSeg's two stages)."""
    samples = records.query_samples(images, texts)
    return self.segment_samples(samples, reasoning=reasoning, batch_size=batch_size)

  def segment_samples(
    self,
    samples: Sequence[Sample],
    *,
    features: str | None = None,
    reasoning: bool = False,
    batch_size: int = 8,
  ) -> list[np.ndarray]:
    """`segment` for sample records (a store's, or `records.query_samples`)."""
    hidden = self.features(samples, features, reasoning)
    items = self._examples(samples, hidden, self.config.data.segmentation.resolution)
    logits = []
    with self.activate() as loaded:
      segment = self.config.segment
      segment_fn = self._program(model.segmenter, self.config, *sorted(segment.items()))
      keys = ("image", "text", "text_mask")
      for batch, real in sharding.padded_batches(items, keys, loaded.mesh, batch_size):
        predicted = segment_fn(
          loaded.params, loaded.vae_params, batch["image"], batch["text"], batch["text_mask"]
        )
        logits.extend(np.asarray(predicted)[:real])
    return [
      undo_resize(x, item["size"], item["resized_size"]) > 0
      for x, item in zip(logits, items, strict=True)
    ]

  def generate(self, prompts: Sequence[str], **options: Any) -> np.ndarray:
    """(N, R, R, 3) uint8 images for the prompts; options as `generate_samples`."""
    return self.generate_samples(records.caption_samples(prompts), **options)

  def generate_samples(
    self,
    samples: Sequence[Sample],
    *,
    features: str | None = None,
    seed: int = 0,
    guidance: float | None = None,
    steps: int | None = None,
    shift: float | None = None,
    resolution: int | None = None,
    batch_size: int = 8,
  ) -> np.ndarray:
    """(N, R, R, 3) uint8 images for the captions of generation samples. Euler sampling with
    classifier-free guidance; `guidance`, `steps` and `shift` default to config.generate,
    `resolution` to the training resolution. Sample k starts from row k of one Gaussian draw
    seeded by `seed`: the same captions and seed give the same images, whatever the batch."""
    config = self.config
    resolution = resolution or config.data.generation.resolution
    multiple = config_check.image_multiple(config)
    if resolution % multiple:
      raise ValueError(
        f"resolution {resolution} is not a multiple of {multiple} (the VAE's stride x the DiT's "
        "patch)"
      )
    if steps is not None or shift is not None:
      config = copy.deepcopy(config)
      config.generate.num_steps = config.generate.num_steps if steps is None else steps
      config.generate.shift = config.generate.shift if shift is None else shift
    guidance = config.generate.guidance_scale if guidance is None else guidance
    hidden = self.features(samples, features)
    items = self._examples(samples, hidden, resolution)
    side = resolution // spatial_stride(config.vae.dim_mult)
    shape = (len(items), 1, side, side, config.vae.z_dim)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))
    items = [dict(item, noise=n) for item, n in zip(items, noise, strict=True)]
    images = []
    with self.activate() as loaded:
      generate_fn = self._program(model.generator, config, *sorted(config.generate.items()))
      keys = ("noise", "text", "text_mask")
      for batch, real in sharding.padded_batches(items, keys, loaded.mesh, batch_size):
        generated = generate_fn(
          loaded.params,
          loaded.vae_params,
          batch["noise"],
          batch["text"],
          batch["text_mask"],
          guidance,
        )
        images.extend(np.asarray(generated)[:real])
    return preprocess.to_uint8(np.stack(images))

  def evaluate(self, split: str | None = None, out_dir: str | None = None) -> dict:
    """Metrics of one split of `config.eval.splits` (or of all), by split name; writes
    results.json, per-sample IoUs and overlays to `out_dir` (default: `workdir/eval`)."""
    config = self.config
    if split is not None:
      names = [s["name"] for s in config.eval.splits]
      if split not in names:
        raise ValueError(f"run {self.workdir}: no split {split!r} in config.eval.splits {names}")
      config = copy.deepcopy(config)
      config.eval.splits = [s for s in config.eval.splits if s["name"] == split]
    config_check.validate(config, "eval")
    out_dir = out_dir or os.path.join(self.workdir, "eval")
    with self.activate() as loaded:
      return evaluate.evaluate_params(
        loaded.models, loaded.params, loaded.vae_params, config, loaded.mesh, out_dir
      )
