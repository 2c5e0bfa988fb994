"""Queries to an opened run (`run.py`): masks for images and texts, images for captions.

A query is a sample record (genmask_jax/data/records.py) with the VLM hidden states of its
text: the element `data/preprocess.example` turns into a model input, so images are decoded,
resized and padded, and texts padded to `config.data.text_len`, exactly as in training and
evaluation. Queries come from a sample store or from the caller; a caller's query has no ground
truth, so its record holds a placeholder target: an all-ignore mask (segmentation) or a black
image (generation). Features come from a feature store or from the VLM run in-process, which
gives images the run's image policy and rounds its hidden states to the run's feature
precision, so that a store sample gets the features its evaluation read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from genmask_jax.data import masks, preprocess, records
from genmask_jax.data.features import (
  STORE_DTYPES,
  FeatureError,
  FeatureMeta,
  FeatureReader,
  check_meta,
)
from genmask_jax.evaluation import resize
from genmask_jax.inference import model as inference
from genmask_jax.inference.run import Run, RunConfig
from genmask_jax.runtime import fileio, sharding
from genmask_jax.vlm import prompts

Sample = records.Sample


@dataclasses.dataclass(frozen=True)
class VLMOptions:
  """A Qwen2.5-VL checkpoint to encode texts in-process."""

  path: str
  model_id: str | None = None  # The encoder's name; default: the directory's name.
  device: str = "cpu"
  dtype: str = "float32"
  batch_size: int = 8
  max_new_tokens: int = 32  # Reasoning mode's rewrite length cap (launch/precompute_vlm.py's).


def segmentation_record(path: str, text: str) -> Sample:
  """The image file at `path` (JPEG or PNG, kept encoded) and a target, without ground truth."""
  data = fileio.read_bytes(path)
  try:
    height, width = records.image_size(data)
  except (records.RecordError, OSError) as e:
    raise records.RecordError(f"{path}: not a readable JPEG or PNG image ({e})") from e
  return records.make_sample(
    sample_id=path,
    task="segmentation",
    image=data,
    text=text,
    source={"path": path},
    mask=np.full((height, width), masks.IGNORE, np.uint8),
  )


def generation_record(index: int, caption: str) -> Sample:
  """A caption; the image it describes is yet to be generated."""
  return records.make_sample(
    sample_id=f"prompt-{index}",
    task="generation",
    image=np.zeros((8, 8, 3), np.uint8),
    text=caption,
    source={},
  )


def store_records(records_dir: str, sample_ids: Sequence[str], task: str) -> list[Sample]:
  """The samples `sample_ids` of a sample store, in order; each must be a `task` sample."""
  reader = records.RecordReader(records_dir)
  samples = [reader.get(sample_id) for sample_id in sample_ids]
  for sample in samples:
    if sample["task"] != task:
      raise records.RecordError(
        f"{records_dir}: sample {sample['id']!r} is a {sample['task']} sample, expected {task}"
      )
  return samples


def template(config: ml_collections.ConfigDict, reasoning: bool) -> str:
  """The prompt template features must have: the run's, or reasoning mode's (as evaluation's
  reasoning splits expect)."""
  return prompts.prompt_template(reasoning=True) if reasoning else config.data.prompt_template


def check_encoder(
  meta: FeatureMeta, config: ml_collections.ConfigDict, reasoning: bool, where: str
) -> None:
  """Refuses features of another encoder, prompt template or width than the model reads."""
  try:
    check_meta(meta, config.data.encoder_model_id, template(config, reasoning))
  except FeatureError as e:
    raise FeatureError(f"{where}: {e}") from e
  if meta.hidden_size != config.dit.text_dim:
    raise FeatureError(
      f"{where}: text features of width {meta.hidden_size}, the DiT's text_dim is "
      f"{config.dit.text_dim}"
    )


def store_features(
  run: RunConfig, samples: Sequence[Sample], features_dir: str, reasoning: bool = False
) -> list[np.ndarray]:
  """(L, D) hidden states stored under the sample ids in a feature store."""
  reader = FeatureReader(features_dir)
  check_encoder(reader.meta, run.config, reasoning, features_dir)
  return [reader.get(sample["id"]) for sample in samples]


def vlm_features(
  run: RunConfig, samples: Sequence[Sample], vlm: VLMOptions, reasoning: bool = False
) -> list[np.ndarray]:
  """(L, D) hidden states of the in-process VLM on launch/precompute_vlm.py's prompts (the
  image through the run's image policy and the instruction, the target first rewritten in
  reasoning mode; or the caption alone), rounded to the run's stored feature precision."""
  import torch  # Only when encoding in-process.

  from genmask_jax.vlm import encode

  model, processor = encode.load_vlm(vlm.path, vlm.device, vlm.dtype)
  model_id = vlm.model_id or os.path.basename(os.path.normpath(vlm.path))
  hidden_size = model.config.text_config.hidden_size
  meta = FeatureMeta(model_id, template(run.config, reasoning), vlm.dtype, hidden_size)
  check_encoder(meta, run.config, reasoning, f"--vlm={vlm.path} (encoder id {model_id!r})")
  items = [
    item
    for start in range(0, len(samples), vlm.batch_size)
    for item in encode.encode_samples(
      model,
      processor,
      samples[start : start + vlm.batch_size],
      reasoning=reasoning,
      max_new_tokens=vlm.max_new_tokens,
      policy=run.image_policy,
    )
  ]
  del model  # Its accelerator memory goes to the JAX model next.
  torch.cuda.empty_cache()
  store_dtype = run.vlm.get("store_dtype")
  if store_dtype in STORE_DTYPES:  # The precision the model was trained and evaluated at.
    return [item.hidden.astype(STORE_DTYPES[store_dtype]).astype(np.float32) for item in items]
  return [item.hidden for item in items]


def examples(
  run: RunConfig, samples: Sequence[Sample], hidden: Sequence[np.ndarray], resolution: int
) -> list[dict]:
  """The model inputs of the queries, preprocessed as the training pipeline does."""
  data = run.config.data
  out = []
  for sample, h in zip(samples, hidden, strict=True):
    try:
      out.append(
        preprocess.example(
          {"sample": sample, "hidden": h},
          resolution=resolution,
          text_len=data.text_len,
          text_dtype=data.text_dtype,
        )
      )
    except FeatureError as e:  # At inference text_len is the trained model's: the text must fit.
      raise FeatureError(
        f"{e}. The run's model reads at most {data.text_len} tokens (image tokens included, "
        f"images given to the VLM as {run.image_policy}): shorten the text"
      ) from e
  return out


def batches(
  items: Sequence[dict], keys: Sequence[str], mesh: jax.sharding.Mesh, batch_size: int
) -> Iterator[tuple[dict[str, jax.Array], int]]:
  """(global batch of `keys`, number of real rows) over `items` in order.

  Every batch has one size (one compilation), a multiple of the mesh's batch axes; the last is
  padded by repeating its last item.
  """
  multiple = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
  size = math.ceil(min(batch_size, len(items)) / multiple) * multiple
  for start in range(0, len(items), size):
    chunk = list(items[start : start + size])
    real = len(chunk)
    chunk += chunk[-1:] * (size - real)
    yield sharding.global_batch({k: np.stack([x[k] for x in chunk]) for k in keys}, mesh), real


def segment(run: Run, items: Sequence[dict], batch_size: int) -> list[np.ndarray]:
  """Boolean masks at each query image's own size: one-step segmentation, logits cropped to
  the resized image, resized back and thresholded at 0 (as evaluation scores them)."""
  logits = []
  with run.activate():
    segment_fn = inference.segmenter(run.models, run.config)
    for batch, real in batches(items, ("image", "text", "text_mask"), run.mesh, batch_size):
      predicted = segment_fn(
        run.params, run.vae_params, batch["image"], batch["text"], batch["text_mask"]
      )
      logits.extend(np.asarray(predicted)[:real])
  return [
    resize.undo_resize(x, item["size"], item["resized_size"]) > 0
    for x, item in zip(logits, items, strict=True)
  ]


def generate(
  run: Run, items: Sequence[dict], resolution: int, seed: int, guidance: float, batch_size: int
) -> np.ndarray:
  """(N, R, R, 3) uint8 images for the queries' captions; batch i draws its noise from
  fold_in(key(seed), i), so the same queries, seed and batch size give the same images."""
  images = []
  with run.activate():
    generate_fn = inference.generator(run.models, run.config, resolution)
    rng = jax.random.key(seed)
    for i, (batch, real) in enumerate(batches(items, ("text", "text_mask"), run.mesh, batch_size)):
      generated = generate_fn(
        run.params,
        run.vae_params,
        jax.random.fold_in(rng, i),
        batch["text"],
        batch["text_mask"],
        guidance,
      )
      images.extend(np.asarray(generated)[:real])
  return ((np.stack(images) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
