"""What launch/predict.py and launch/generate.py share: their common flags, the trained model,
queries with their VLM features, and fixed-size batches.

A query is a sample record (genmask_jax/data/records.py) with the VLM hidden states of its
text: the element `pipeline.preprocess` turns into a model input, so images are decoded,
resized and padded, and texts padded to `config.data.text_len`, exactly as in training.
Queries come from a sample store (--records, --sample_id) or from the command line; a
command-line query has no ground truth, so its record holds a placeholder target: an
all-ignore mask (segmentation) or a black image (generation). Features come from a feature
store (--features, written by launch/precompute_vlm.py) or from the VLM run in-process (--vlm);
either way the encoder and prompt template must be those of `config.data`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags
from PIL import Image

from genmask_jax import fileio, inference, metrics, sharding
from genmask_jax.data import pipeline, records
from genmask_jax.data.features import FeatureError, FeatureMeta, FeatureReader, check_meta
from genmask_jax.genmask import Models
from genmask_jax.vlm import prompts

CONFIG = config_flags.DEFINE_config_file("config", None, "The trained model's config file.")
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Training workdir: its latest checkpoint.", required=True
)
_RECORDS = flags.DEFINE_string("records", None, "Sample store holding the --sample_id samples.")
_SAMPLE_ID = flags.DEFINE_multi_string("sample_id", [], "A sample of --records; repeatable.")
_FEATURES = flags.DEFINE_string("features", None, "Feature store of --records (precomputed).")
_VLM = flags.DEFINE_string("vlm", None, "Qwen2.5-VL directory: encode the texts in-process.")
_VLM_MODEL_ID = flags.DEFINE_string("vlm_model_id", None, "Encoder name; default: --vlm's name.")
_VLM_DEVICE = flags.DEFINE_string("vlm_device", "cpu", "torch device of the VLM.")
_VLM_DTYPE = flags.DEFINE_enum(
  "vlm_dtype", "float32", ["float32", "bfloat16", "float16"], "torch dtype of the VLM."
)
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 512 * 512, "Image area cap for the VLM.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Queries per forward pass.")

Sample = records.Sample


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  models: Models
  params: Any
  vae_params: Any
  mesh: jax.sharding.Mesh


@contextlib.contextmanager
def trained_model(cfg: ml_collections.ConfigDict) -> Iterator[TrainedModel]:
  """The model of --workdir (inference.restore_params), used inside its mesh and rules."""
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules(cfg.get("sharding"))
  models = Models.from_config(cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, vae_params = inference.restore_params(cfg, _WORKDIR.value, models, mesh, rules)
    yield TrainedModel(models, params, vae_params, mesh)


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
    mask=np.full((height, width), metrics.IGNORE, np.uint8),
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


def store_records(task: str) -> list[Sample]:
  """The --sample_id samples of --records, in order; each must be a `task` sample."""
  if not _SAMPLE_ID.value:
    return []
  if _RECORDS.value is None:
    raise app.UsageError("--sample_id needs --records, the sample store holding it")
  reader = records.RecordReader(_RECORDS.value)
  samples = [reader.get(sample_id) for sample_id in _SAMPLE_ID.value]
  for sample in samples:
    if sample["task"] != task:
      raise records.RecordError(
        f"{_RECORDS.value}: sample {sample['id']!r} is a {sample['task']} sample, expected {task}"
      )
  return samples


def _check_encoder(meta: FeatureMeta, cfg: ml_collections.ConfigDict, where: str) -> None:
  try:
    check_meta(meta, cfg.data.encoder_model_id, cfg.data.prompt_template)
  except FeatureError as e:
    raise FeatureError(f"{where}: {e}") from e
  if meta.hidden_size != cfg.dit.text_dim:
    raise FeatureError(
      f"{where}: text features of width {meta.hidden_size}, the DiT's text_dim is "
      f"{cfg.dit.text_dim}"
    )


def _vlm_features(samples: Sequence[Sample], cfg: ml_collections.ConfigDict) -> list[np.ndarray]:
  """The --vlm's hidden states on the prompts of launch/precompute_vlm.py: the image and the
  segmentation instruction, or the caption alone."""
  import torch  # Only when encoding in-process.

  from genmask_jax.vlm import encode

  model, processor = encode.load_vlm(_VLM.value, _VLM_DEVICE.value, _VLM_DTYPE.value)
  model_id = _VLM_MODEL_ID.value or os.path.basename(os.path.normpath(_VLM.value))
  hidden_size = model.config.text_config.hidden_size
  meta = FeatureMeta(model_id, prompts.prompt_template(), _VLM_DTYPE.value, hidden_size)
  _check_encoder(meta, cfg, f"--vlm={_VLM.value} (--vlm_model_id {model_id!r})")
  batch = [
    encode.Prompt(
      prompts.segmentation_messages(s["text"]), Image.fromarray(records.decode_image(s))
    )
    if s["task"] == "segmentation"
    else encode.Prompt(prompts.generation_messages(s["text"]), None)
    for s in samples
  ]
  size = _BATCH_SIZE.value
  hidden = [
    h
    for start in range(0, len(batch), size)
    for h in encode.encode_prompts(model, processor, batch[start : start + size], _MAX_PIXELS.value)
  ]
  del model  # Its accelerator memory goes to the JAX model next.
  torch.cuda.empty_cache()
  return hidden


def text_features(samples: Sequence[Sample], cfg: ml_collections.ConfigDict) -> list[np.ndarray]:
  """(L, D) hidden states per sample: computed by the --vlm, or those stored under the sample
  ids in --features (store samples only)."""
  if not samples:
    raise app.UsageError("nothing to do: give queries on the command line or --sample_id")
  if (_VLM.value is None) == (_FEATURES.value is None):
    raise app.UsageError("give exactly one of --vlm (encode in-process) and --features")
  if _VLM.value is not None:
    return _vlm_features(samples, cfg)
  if len(samples) != len(_SAMPLE_ID.value):
    raise app.UsageError("--features holds store samples only: encode other queries with --vlm")
  reader = FeatureReader(_FEATURES.value)
  _check_encoder(reader.meta, cfg, _FEATURES.value)
  return [reader.get(sample["id"]) for sample in samples]


def examples(
  samples: Sequence[Sample],
  hidden: Sequence[np.ndarray],
  resolution: int,
  data_cfg: ml_collections.ConfigDict,
) -> list[dict]:
  """The model inputs of the queries, preprocessed by the training pipeline."""
  return [
    pipeline.preprocess(
      {"sample": sample, "hidden": h},
      resolution=resolution,
      text_len=data_cfg.text_len,
      text_dtype=data_cfg.text_dtype,
    )
    for sample, h in zip(samples, hidden, strict=True)
  ]


def batches(
  items: Sequence[dict], keys: Sequence[str], mesh: jax.sharding.Mesh
) -> Iterator[tuple[dict[str, jax.Array], int]]:
  """(global batch of `keys`, number of real rows) over `items` in order.

  Every batch has one size (one compilation), a multiple of the mesh's batch axes; the last is
  padded by repeating its last item.
  """
  multiple = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
  size = math.ceil(min(_BATCH_SIZE.value, len(items)) / multiple) * multiple
  for start in range(0, len(items), size):
    chunk = list(items[start : start + size])
    real = len(chunk)
    chunk += chunk[-1:] * (size - real)
    yield sharding.global_batch({k: np.stack([x[k] for x in chunk]) for k in keys}, mesh), real
