"""grain input pipelines: samples joined with their VLM features (and latents), decoded,
resized and padded (preprocess.py).

Every sample store (records.py) is paired with a feature store (features.py) whose rows are
its samples in order, encoded by the configured model with the configured prompt template;
anything else is an error naming the store or the sample. The config is the data section of an
experiment config (configs/data.py); an example is described in preprocess.py.

Training (`train_dataset`): every step holds a segmentation batch and a generation batch,
each at its own resolution: {"segmentation": {...}, "generation": {...}}. A task's examples
are one stream for the whole job, shuffled with a new order every epoch (several stores of one
task concatenated, or mixed by weight when weights are given) and cut into global batches of
`global_batch_size`. A semantic source with `classes_per_use: k` contributes up to k slots per
image, filled anew each epoch (class_draws.py). Process i of n (ShardOptions /
ShardByJaxProcess) reads, and sees, only the i-th n-th of each global batch, so the global
batches are the same on 1, 2 or 64 processes. Iteration is deterministic given the seed and
the number of worker processes (each worker batches its own share of the stream), and the
iterator's get_state() / set_state() resume it exactly.

Evaluation (`eval_dataset`): one store in order, split over processes; the last batches are
padded with `valid = False` examples so that every process runs the same number of steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np
from grain.experimental import ZipMapDataset

from genmask_jax.data import preprocess, records, store, tasks
from genmask_jax.data.class_draws import ClassDraws
from genmask_jax.data.features import FeatureReader, check_meta
from genmask_jax.data.latents import LatentReader
from genmask_jax.data.preprocess import TEXT_DTYPES
from genmask_jax.data.store import StoreError

SOURCE_KEYS = {"records", "features", "latents", "weight", "classes_per_use"}


class JoinedSource:
  """A sample store joined with its feature store (and its latent store), row by row: their
  ids are checked once, here; grain random access."""

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
    except StoreError as e:
      raise StoreError(f"{features_dir}: {e}") from e
    held = set(self.samples.meta.tasks)
    if held != {task}:
      raise StoreError(f"{records_dir}: holds {sorted(held)} samples, expected {task}")
    store.check_aligned(self.features, self.samples)
    self.latents = None
    if latents_dir:
      self.latents = LatentReader(latents_dir)
      meta = self.latents.meta
      if (meta.task, meta.resolution) != (task, resolution):
        raise StoreError(
          f"{latents_dir} holds {meta.task} latents at resolution {meta.resolution}, expected "
          f"{task} at {resolution}"
        )
      store.check_aligned(self.latents, self.samples)

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict:
    element = {"sample": self.samples[index], "hidden": self.features[index].hidden}
    if self.latents is not None:
      element["latents"] = self.latents[index]
    return element


def process_batch_size(global_batch_size: int, process_count: int) -> int:
  """Each process's share of a global batch; ValueError naming both unless it divides."""
  if global_batch_size % process_count:
    raise ValueError(
      f"config: global_batch_size {global_batch_size} does not split over {process_count} "
      f"processes; use a multiple of {process_count}"
    )
  return global_batch_size // process_count


class _ProcessSlice(grain.MapDataset):
  """Process `index` of `count`'s part of a stream cut into global batches of `count * batch`
  examples: element m is example `batch * index + m % batch` of global batch `m // batch`."""

  def __init__(self, parent: grain.MapDataset, index: int, count: int, batch: int):
    super().__init__(parent)
    self._index, self._count, self._batch = index, count, batch

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def __getitem__(self, m):
    if isinstance(m, slice):
      return self.slice(m)
    step, j = divmod(m, self._batch)
    return self._parent[(step * self._count + self._index) * self._batch + j]

  def __str__(self) -> str:
    return f"_ProcessSlice(index={self._index}, count={self._count}, batch={self._batch})"


def _seed(seed: int, *keys: int) -> int:
  return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _task_examples(
  cfg: ml_collections.ConfigDict, task: str, shard: grain.sharding.ShardOptions
) -> grain.MapDataset:
  """The endless, shuffled, preprocessed examples of one task that this process reads."""
  task_cfg = cfg[task]
  if not task_cfg.sources:
    raise ValueError(f"config: data.{task}.sources is empty")
  for i, source in enumerate(task_cfg.sources):
    unknown = set(source) - SOURCE_KEYS
    if unknown or "records" not in source or "features" not in source:
      raise ValueError(
        f"config: data.{task}.sources[{i}] has keys {sorted(source)}; expected records, "
        f"features and optionally {sorted(SOURCE_KEYS - {'records', 'features'})}"
      )
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
    raise StoreError(f"config: data.{task}.sources have features of different widths")
  task_key = tasks.NAMES.index(task)
  draws = [
    _class_draws(j, s, _seed(cfg.seed, task_key, i, 1))
    if s.get("classes_per_use") is not None
    else None
    for i, (j, s) in enumerate(zip(joined, task_cfg.sources, strict=True))
  ]
  # Streams of (source, slot): a slot is a row, or one of an image's class draws (ClassDraws).
  sizes = [len(j if d is None else d) for d, j in zip(draws, joined, strict=True)]
  slots = [
    grain.MapDataset.range(n).map(functools.partial(_tagged, i)) for i, n in enumerate(sizes)
  ]
  weights = [s.get("weight") for s in task_cfg.sources]
  if all(w is None for w in weights):
    ds = grain.MapDataset.concatenate(slots).shuffle(_seed(cfg.seed, task_key)).repeat()
    ds = ds.map_with_index(functools.partial(_read, joined, draws, sum(sizes)))
  elif None in weights:
    raise ValueError(f"config: give every source of data.{task} a weight, or none")
  else:
    ds = grain.MapDataset.mix(
      [
        p.shuffle(_seed(cfg.seed, task_key, i))
        .repeat()
        .map_with_index(functools.partial(_read, joined, draws, sizes[i]))
        for i, p in enumerate(slots)
      ],
      weights,
    )
  batch = process_batch_size(task_cfg.global_batch_size, shard.shard_count)
  ds = _ProcessSlice(ds, shard.shard_index, shard.shard_count, batch)
  return ds.map(_preprocessor(cfg, task_cfg.resolution))


def _class_draws(joined: JoinedSource, source: dict, seed: int) -> ClassDraws:
  kept = joined.samples.meta.info.get("classes_per_image", 0)
  if kept:
    raise StoreError(
      f"{source['records']}: converted with classes_per_image={kept} (classes drawn once); "
      "classes_per_use draws from every class of an image: convert again with "
      "--classes_per_image=0"
    )
  return ClassDraws(joined.samples.ids(), source["classes_per_use"], seed, source["records"])


def _tagged(source: int, slot: int) -> tuple[int, int]:
  return source, slot


def _read(joined, draws, epoch_size: int, index: int, tagged: tuple[int, int]) -> dict:
  """Element `index` of an endless stream whose epochs hold `epoch_size` slots."""
  source, slot = tagged
  draw = draws[source]
  return joined[source][slot if draw is None else draw.row(slot, index // epoch_size)]


def _preprocessor(cfg: ml_collections.ConfigDict, resolution: int):
  if cfg.text_dtype not in TEXT_DTYPES:
    raise ValueError(f"config: text_dtype {cfg.text_dtype!r} is not one of {list(TEXT_DTYPES)}")
  return functools.partial(
    preprocess.example, resolution=resolution, text_len=cfg.text_len, text_dtype=cfg.text_dtype
  )


def _by_task(parts: Sequence[dict], names: Sequence[str]) -> dict:
  return dict(zip(names, parts, strict=True))


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
  trained = [t for t in tasks.NAMES if t == "segmentation" or cfg[t].sources]
  sizes = {t: cfg[t].global_batch_size for t in trained}
  if len(set(sizes.values())) > 1:
    raise ValueError(
      f"config: segmentation and generation are mixed 1:1, global batch sizes must agree: {sizes}"
    )
  examples = [_task_examples(cfg, t, shard) for t in trained]
  steps = ZipMapDataset(examples).map(functools.partial(_by_task, names=trained))
  return _finish(steps, cfg, process_batch_size(sizes["segmentation"], shard.shard_count))


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
