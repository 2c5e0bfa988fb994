"""grain input pipelines: samples joined with their VLM features (and latents), decoded,
resized and padded.

Every sample store (records.py) is paired with a feature store (features.py) holding its ids,
encoded by the configured model with the configured prompt template; anything else is an
error naming the store or the sample. One preprocessed example is

  image        float32 (R, R, 3) in [-1, 1]: resized so that the longer side is R, then padded
               at the bottom / right with -1 (black)
  mask         uint8 (R, R) in {0, 1, 255} (segmentation only), nearest-neighbour resized,
               padding 0
  text         (S, D) VLM hidden states, zero-padded to S = text_len (never truncated)
  text_mask    bool (S,), True on real tokens
  size         int32 (2,): the original (height, width)
  resized_size int32 (2,): (height, width) of the image inside the padded square; a
               prediction is undone by cropping [:h, :w] and resizing to `size`
  image_latents, mask_latents
               float32 (R/s, R/s, z_dim), only for sources with a latent store (latents.py):
               the VAE latents of the image and of `mask`, read instead of encoded every step;
               such examples hold no `image` (it is neither decoded nor resized)

Training (`train_dataset`): every step holds a segmentation batch and a generation batch of
the same per-process size B, each at its own resolution: {"segmentation": {...},
"generation": {...}}. Each process reads its own slice of every store (ShardOptions /
ShardByJaxProcess), shuffled with a new order every epoch; several stores of one task are
concatenated, or mixed by weight when weights are given. Iteration is deterministic given the
seed and the number of worker processes (each worker batches its own share of the stream), and
the iterator's get_state() / set_state() resume it exactly.

Evaluation (`eval_dataset`): one store in order, split over processes; the last batches are
padded with `valid = False` examples so that every process runs the same number of steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import cv2
import grain
import ml_collections
import ml_dtypes
import numpy as np
from grain.experimental import ZipMapDataset

from genmask_jax.data import records
from genmask_jax.data.features import FeatureError, FeatureReader, check_meta
from genmask_jax.data.latents import LatentError, LatentReader
from genmask_jax.vlm.prompts import prompt_template

TEXT_DTYPES = {
  "float32": np.dtype(np.float32),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float16": np.dtype(np.float16),
}


def default_config() -> ml_collections.ConfigDict:
  """The data section of an experiment config."""

  def task() -> dict:
    return dict(
      # Each source: {"records": sample store dir, "features": feature store dir,
      # "latents": optional latent store dir (all or none of a task's sources have one),
      # "weight": optional mixing weight (all or none of a task's sources have one)}.
      sources=[],
      resolution=512,
      batch_size=8,  # Per process; the same for both tasks.
    )

  return ml_collections.ConfigDict(
    dict(
      seed=0,
      text_len=512,
      text_dtype="float32",  # bfloat16 halves host memory; the DiT casts anyway.
      encoder_model_id="Qwen2.5-VL-7B-Instruct",
      prompt_template=prompt_template(),
      num_workers=0,  # grain worker processes per host; 0 reads in this process.
      num_threads=8,  # Reader threads per process / worker.
      prefetch_buffer_size=32,  # Examples read ahead per process / worker.
      segmentation=task(),
      generation=task(),
    )
  )


class JoinedSource:
  """A sample store joined with its feature store by sample id (and its latent store, aligned
  by index); grain random access."""

  def __init__(
    self,
    records_dir: str,
    features_dir: str,
    *,
    task: str,
    model_id: str,
    template: str,
    latents_dir: str | None = None,
    resolution: int | None = None,
  ):
    self.samples = records.RecordReader(records_dir)
    self.features = FeatureReader(features_dir)
    try:
      check_meta(self.features.meta, model_id, template)
    except FeatureError as e:
      raise FeatureError(f"{features_dir}: {e}") from e
    tasks = set(self.samples.meta["tasks"])
    if tasks != {task}:
      raise records.RecordError(f"{records_dir}: holds {sorted(tasks)} samples, expected {task}")
    have = set(self.features.ids())
    missing = [i for i in self.samples.ids() if i not in have]
    if missing:
      raise FeatureError(
        f"{features_dir} has no features for sample {missing[0]!r} of {records_dir} "
        f"({len(missing)} samples missing): encode this sample store with "
        "launch/precompute_vlm.py"
      )
    self.latents = None
    if latents_dir:
      self.latents = LatentReader(latents_dir)
      meta = self.latents.meta
      if (meta.task, meta.resolution) != (task, resolution):
        raise LatentError(
          f"{latents_dir} holds {meta.task} latents at resolution {meta.resolution}, expected "
          f"{task} at {resolution}"
        )
      if self.latents.ids() != self.samples.ids():
        raise LatentError(
          f"{latents_dir}: its ids are not those of {records_dir} in order: re-run "
          "launch/precompute_latents.py for this sample store"
        )

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict:
    sample = self.samples[index]
    element = {"sample": sample, "hidden": self.features.get(sample["id"])}
    if self.latents is not None:
      element["latents"] = self.latents[index]
    return element


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
  """(h, w) with the longer side `resolution` and the aspect ratio kept."""
  scale = resolution / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize_and_pad(array: np.ndarray, resolution: int, nearest: bool) -> np.ndarray:
  """Longer side to `resolution`, then zero-padded at the bottom / right to a square."""
  h, w = array.shape[:2]
  rh, rw = resized_shape(h, w, resolution)
  if nearest:
    method = cv2.INTER_NEAREST
  else:  # Area averaging when shrinking avoids aliasing; bilinear when enlarging.
    method = cv2.INTER_AREA if rh < h else cv2.INTER_LINEAR
  out = np.zeros((resolution, resolution) + array.shape[2:], array.dtype)
  out[:rh, :rw] = cv2.resize(array, (rw, rh), interpolation=method)
  return out


def pixels(sample: Mapping, resolution: int, with_image: bool = True) -> dict[str, np.ndarray]:
  """A sample's image (unless `with_image` is False) and mask as the model sees them, with their
  sizes (module docstring)."""
  h, w = sample["height"], sample["width"]  # decode_image checks that the image has them.
  out = {
    "size": np.array([h, w], np.int32),
    "resized_size": np.array(resized_shape(h, w, resolution), np.int32),
  }
  if with_image:
    image = resize_and_pad(records.decode_image(sample), resolution, False)
    out["image"] = image.astype(np.float32) / 127.5 - 1
  if sample["task"] == "segmentation":
    out["mask"] = resize_and_pad(records.decode_mask(sample), resolution, True)
  return out


def preprocess(element: Mapping, *, resolution: int, text_len: int, text_dtype: str) -> dict:
  """One joined sample -> one example (see the module docstring)."""
  sample, hidden = element["sample"], element["hidden"]
  if "latents" in element:  # The image's latents replace it.
    example = pixels(sample, resolution, with_image=False) | element["latents"]
  else:
    example = pixels(sample, resolution)
  if hidden.shape[0] > text_len:
    raise FeatureError(
      f"sample {sample['id']!r}: {hidden.shape[0]} text tokens exceed text_len={text_len}; "
      "raise text_len (the DiT's text length) rather than truncate"
    )
  text = np.zeros((text_len, hidden.shape[1]), TEXT_DTYPES[text_dtype])
  text[: hidden.shape[0]] = hidden
  example["text"] = text
  example["text_mask"] = np.arange(text_len) < hidden.shape[0]
  return example


def _shard(ds: grain.MapDataset, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
  if shard.drop_remainder:
    ds = ds[: len(ds) // shard.shard_count * shard.shard_count]
  return ds[shard.shard_index :: shard.shard_count]


def _seed(seed: int, *keys: int) -> int:
  return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _task_examples(
  cfg: ml_collections.ConfigDict, task: str, shard: grain.sharding.ShardOptions
) -> grain.MapDataset:
  """The endless, shuffled, preprocessed examples of one task for this process."""
  task_cfg = cfg[task]
  if not task_cfg.sources:
    raise ValueError(f"config: data.{task}.sources is empty")
  with_latents = [bool(s.get("latents")) for s in task_cfg.sources]
  if any(with_latents) and not all(with_latents):
    raise ValueError(f"config: give every source of data.{task} a latent store, or none")
  joined = [
    JoinedSource(
      s["records"],
      s["features"],
      task=task,
      model_id=cfg.encoder_model_id,
      template=cfg.prompt_template,
      latents_dir=s.get("latents"),
      resolution=task_cfg.resolution,
    )
    for s in task_cfg.sources
  ]
  if len({j.features.meta.hidden_size for j in joined}) != 1:
    raise FeatureError(f"config: data.{task}.sources have features of different widths")
  parts = [_shard(grain.MapDataset.source(j), shard) for j in joined]
  task_key = records.TASKS.index(task)
  weights = [s.get("weight") for s in task_cfg.sources]
  if all(w is None for w in weights):
    ds = grain.MapDataset.concatenate(parts).shuffle(_seed(cfg.seed, task_key)).repeat()
  elif None in weights:
    raise ValueError(f"config: give every source of data.{task} a weight, or none")
  else:
    ds = grain.MapDataset.mix(
      [p.shuffle(_seed(cfg.seed, task_key, i)).repeat() for i, p in enumerate(parts)], weights
    )
  return ds.map(_preprocessor(cfg, task_cfg.resolution))


def _preprocessor(cfg: ml_collections.ConfigDict, resolution: int):
  if cfg.text_dtype not in TEXT_DTYPES:
    raise ValueError(f"config: text_dtype {cfg.text_dtype!r} is not one of {list(TEXT_DTYPES)}")
  return functools.partial(
    preprocess, resolution=resolution, text_len=cfg.text_len, text_dtype=cfg.text_dtype
  )


def _by_task(parts: Sequence[dict], tasks: Sequence[str]) -> dict:
  return dict(zip(tasks, parts, strict=True))


def _finish(ds: grain.MapDataset, cfg, batch_size: int) -> grain.IterDataset:
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
  ).batch(batch_size, drop_remainder=True)
  if cfg.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds


def train_dataset(
  cfg: ml_collections.ConfigDict, shard: grain.sharding.ShardOptions | None = None
) -> grain.IterDataset:
  """Endless steps of {"segmentation": batch, "generation": batch}; iterate with iter().

  With no generation sources the steps hold segmentation only (the paper's "without
  generation data" ablation).
  """
  shard = shard or grain.sharding.ShardByJaxProcess()
  tasks = [t for t in records.TASKS if t == "segmentation" or cfg[t].sources]
  if len(tasks) == 2 and cfg.segmentation.batch_size != cfg.generation.batch_size:
    raise ValueError("config: segmentation and generation are mixed 1:1, batch sizes must agree")
  examples = [_task_examples(cfg, t, shard) for t in tasks]
  steps = ZipMapDataset(examples).map(functools.partial(_by_task, tasks=tasks))
  return _finish(steps, cfg, cfg.segmentation.batch_size)


def eval_dataset(
  cfg: ml_collections.ConfigDict,
  records_dir: str,
  features_dir: str,
  *,
  batch_size: int,
  shard: grain.sharding.ShardOptions | None = None,
  template: str | None = None,
) -> grain.IterDataset:
  """This process's share of a segmentation store, in order, in equal numbers of batches.

  Examples also hold `index` (int64, the record index: read the original-resolution mask
  with RecordReader(records_dir)[index]) and `valid` (False on padding, which repeats sample 0
  and must not be counted). `template` overrides the expected prompt template (the
  reasoning-mode one for ReasonSeg).
  """
  shard = shard or grain.sharding.ShardByJaxProcess()
  source = JoinedSource(
    records_dir,
    features_dir,
    task="segmentation",
    model_id=cfg.encoder_model_id,
    template=template or cfg.prompt_template,
  )
  n, count = len(source), shard.shard_count
  mine = list(range(shard.shard_index, n, count))
  total = math.ceil(math.ceil(n / count) / batch_size) * batch_size  # Same on every process.
  # Padding repeats sample 0 (a process may have none of its own) and is marked invalid.
  pairs = [(i, True) for i in mine] + [(0, False)] * (total - len(mine))
  prep = _preprocessor(cfg, cfg.segmentation.resolution)
  examples = grain.MapDataset.source(pairs).map(
    functools.partial(_eval_example, source=source, prep=prep)
  )
  return _finish(examples, cfg, batch_size)


def _eval_example(index_valid: tuple[int, bool], *, source: JoinedSource, prep) -> dict:
  index, valid = index_valid
  return dict(prep(source[index]), index=np.int64(index), valid=np.bool_(valid))
