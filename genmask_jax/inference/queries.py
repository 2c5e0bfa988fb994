"""Queries to a trained run, as the model reads them: sample records and their text features.

A query is a sample record (data/records.py): the element `data/preprocess.example` turns into
a model input, so images are decoded, resized and padded, and texts padded to
`config.data.text_len`, exactly as in training and evaluation. Queries come from a sample store
or from the caller; a caller's query has no ground truth, so its record holds a placeholder
target: an all-ignore mask (segmentation) or a black image (generation). Text features come from
a feature store or from the VLM run in-process, which gives images the run's image policy and
rounds its hidden states to the run's feature precision, so that a store sample gets the
features its evaluation read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from genmask_jax.data import masks, preprocess, records
from genmask_jax.data.features import (
  STORE_DTYPES,
  FeatureError,
  FeatureMeta,
  FeatureReader,
  check_meta,
)
from genmask_jax.runtime import fileio, sharding
from genmask_jax.vlm import image_policy, prompts

Sample = records.Sample
ImageLike = str | np.ndarray | Image.Image  # A JPEG / PNG file, an (H, W, 3) uint8 array, PIL.


@dataclasses.dataclass(frozen=True)
class VLM:
  """A Qwen2.5-VL checkpoint that encodes texts in-process."""

  path: str
  model_id: str | None = None  # The encoder's name; default: the directory's name.
  device: str = "cpu"
  dtype: str = "float32"
  batch_size: int = 8
  max_new_tokens: int = 32  # Reasoning mode's rewrite length cap (launch/precompute_vlm.py's).


def segmentation_records(images: Sequence[ImageLike], texts: Sequence[str]) -> list[Sample]:
  """Query records of images (files, arrays or PIL images), one text each."""
  if len(images) != len(texts):
    raise ValueError(f"one text per image: got {len(images)} images, {len(texts)} texts")
  pairs = enumerate(zip(images, texts, strict=True))
  return [_segmentation_record(image, text, i) for i, (image, text) in pairs]


def generation_records(prompts: Sequence[str]) -> list[Sample]:
  """Query records of captions, whose images are yet to be generated."""
  return [_generation_record(i, prompt) for i, prompt in enumerate(prompts)]


def _segmentation_record(image: ImageLike, text: str, index: int) -> Sample:
  """A query image with its target, without ground truth. Files stay encoded as they are (their
  id is the path); arrays and PIL images are stored as PNG (id `image-{index}`)."""
  if isinstance(image, str):
    data = fileio.read_bytes(image)
    try:
      height, width = records.image_size(data)
    except (records.RecordError, OSError) as e:
      raise records.RecordError(f"{image}: not a readable JPEG or PNG image ({e})") from e
    sample_id, source = image, {"path": image}
  else:
    data = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if data.ndim != 3 or data.shape[-1] != 3 or data.dtype != np.uint8:
      raise records.RecordError(
        f"image {index}: expected an (H, W, 3) uint8 array, got {data.dtype} {data.shape}"
      )
    height, width = data.shape[:2]
    sample_id, source = f"image-{index}", {}
  return records.make_sample(
    sample_id=sample_id,
    task="segmentation",
    image=data,
    text=text,
    source=source,
    mask=np.full((height, width), masks.IGNORE, np.uint8),
  )


def _generation_record(index: int, caption: str) -> Sample:
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
  config: ml_collections.ConfigDict,
  samples: Sequence[Sample],
  features_dir: str,
  reasoning: bool = False,
) -> list[np.ndarray]:
  """(L, D) hidden states stored under the sample ids in a feature store."""
  reader = FeatureReader(features_dir)
  check_encoder(reader.meta, config, reasoning, features_dir)
  return [reader.get(sample["id"]) for sample in samples]


def vlm_features(
  config: ml_collections.ConfigDict,
  vlm_settings: Mapping,
  samples: Sequence[Sample],
  vlm: VLM,
  reasoning: bool = False,
) -> list[np.ndarray]:
  """(L, D) hidden states of the in-process VLM on launch/precompute_vlm.py's prompts (the
  image through the run's image policy and the instruction, the target first rewritten in
  reasoning mode; or the caption alone), rounded to the precision of the run's feature stores
  (`vlm_settings`, the run record's)."""
  import torch  # Only when encoding in-process.

  from genmask_jax.vlm import encode

  model, processor = encode.load_vlm(vlm.path, vlm.device, vlm.dtype)
  model_id = vlm.model_id or os.path.basename(os.path.normpath(vlm.path))
  hidden_size = model.config.text_config.hidden_size
  meta = FeatureMeta(
    model_id, template(config, reasoning), vlm.dtype, hidden_size, vlm_settings["image_policy"]
  )
  check_encoder(meta, config, reasoning, f"vlm {vlm.path} (encoder id {model_id!r})")
  items = [
    item
    for start in range(0, len(samples), vlm.batch_size)
    for item in encode.encode_samples(
      model,
      processor,
      samples[start : start + vlm.batch_size],
      reasoning=reasoning,
      max_new_tokens=vlm.max_new_tokens,
      policy=image_policy.from_record(vlm_settings["image_policy"]),
    )
  ]
  del model  # Its accelerator memory goes to the JAX model next.
  torch.cuda.empty_cache()
  store_dtype = vlm_settings["store_dtype"]
  if store_dtype in STORE_DTYPES:  # The precision the model was trained and evaluated at.
    return [item.hidden.astype(STORE_DTYPES[store_dtype]).astype(np.float32) for item in items]
  return [item.hidden for item in items]


def examples(
  config: ml_collections.ConfigDict,
  samples: Sequence[Sample],
  hidden: Sequence[np.ndarray],
  resolution: int,
) -> list[dict]:
  """The model inputs of the queries, preprocessed as the training pipeline does."""
  data = config.data
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
        f"{e}. The run's model reads at most {data.text_len} tokens (image tokens included): "
        "shorten the text"
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
