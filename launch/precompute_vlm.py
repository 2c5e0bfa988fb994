r"""Encodes a sample store with a frozen Qwen2.5-VL into a feature store (PyTorch, offline).

  python -m launch.precompute_vlm --samples=data/refcoco_train \
      --checkpoint=Qwen2.5-VL-7B-Instruct --out=features/refcoco_train_qwen7b \
      --num_workers=8 --worker_index=0 --batch_size=16 --device=cuda --dtype=bfloat16

Segmentation samples become the image plus "Please segment the {target} in the image.",
generation samples the caption alone (paper 2.3); the final-layer hidden states of the kept
tokens (genmask_jax/vlm/prompts.py) are stored as bf16/fp16 under the sample id.
Worker i of n encodes the i-th contiguous slice of the sample store in shards of
--shard_size samples; re-running the same command skips finished shards, and whichever worker
finishes last writes the manifest that makes the store readable. --reasoning first asks the VLM
to rewrite each segmentation query into an explicit target description and encodes that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags, logging
from PIL import Image

from genmask_jax.data.features import (
  FeatureError,
  FeatureItem,
  FeatureMeta,
  FeatureReader,
  FeatureWriter,
  StoreLayout,
)
from genmask_jax.data.records import TASKS, RecordReader, decode_image
from genmask_jax.vlm import encode, prompts

_SAMPLES = flags.DEFINE_string("samples", None, "Sample store directory.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Qwen2.5-VL directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Feature store directory.", required=True)
_MODEL_ID = flags.DEFINE_string("model_id", None, "Encoder name recorded; default: dir name.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per forward pass.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 256, "Samples per output shard.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Workers sharing the sample store.")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This worker, in [0, num_workers).")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device: cpu, cuda, cuda:1, ...")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(encode.TORCH_DTYPES), "VLM compute dtype.")
_STORE_DTYPE = flags.DEFINE_enum("store_dtype", "bfloat16", ["bfloat16", "float16"], "Stored.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 512 * 512, "Image area cap for the VLM.")
_REASONING = flags.DEFINE_bool("reasoning", False, "Rewrite segmentation queries first.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Rewrite length cap.")


def _image(sample: dict) -> Image.Image:
  return Image.fromarray(decode_image(sample))


def _rewrite_targets(model, processor, samples, max_new_tokens, max_pixels) -> list[str]:
  batch = [encode.Prompt(prompts.rewrite_messages(s["text"]), _image(s)) for s in samples]
  rewrites = encode.generate_text(model, processor, batch, max_new_tokens, max_pixels)
  targets = []
  for sample, rewrite in zip(samples, rewrites, strict=True):
    if not rewrite:  # An empty answer would encode no target at all: keep the query.
      logging.warning("sample %r: empty rewrite, encoding the query itself", sample["id"])
    targets.append(rewrite or sample["text"])
  return targets


def encode_samples(
  model,
  processor,
  samples: Sequence[dict],
  reasoning: bool = False,
  max_new_tokens: int = 32,
  max_pixels: int | None = None,
) -> list[FeatureItem]:
  """Feature items of sample-store records (genmask_jax/data/records.py), in order."""
  for s in samples:
    if s["task"] not in TASKS:
      raise ValueError(f"sample {s['id']!r}: task {s['task']!r} is not one of {TASKS}")
  texts = [s["text"] for s in samples]
  seg = [i for i, s in enumerate(samples) if s["task"] == "segmentation"]
  if reasoning and seg:
    rewrites = _rewrite_targets(
      model, processor, [samples[i] for i in seg], max_new_tokens, max_pixels
    )
    for i, rewrite in zip(seg, rewrites, strict=True):
      texts[i] = rewrite
  batch = [
    encode.Prompt(prompts.segmentation_messages(text), _image(s))
    if s["task"] == "segmentation"
    else encode.Prompt(prompts.generation_messages(text), None)
    for s, text in zip(samples, texts, strict=True)
  ]
  hidden = encode.encode_prompts(model, processor, batch, max_pixels)
  return [FeatureItem(s["id"], t, h) for s, t, h in zip(samples, texts, hidden, strict=True)]


def precompute(
  model,
  processor,
  samples: Sequence[dict],
  writer: FeatureWriter,
  batch_size: int,
  **encode_kwargs,
) -> bool:
  """Writes this worker's pending shards; returns whether the whole store is now complete.

  Batches never cross shard boundaries, so a resumed run computes exactly what an
  uninterrupted one would have.
  """
  for shard, start, stop in writer.pending_shards():
    items = []
    for b in range(start, stop, batch_size):
      batch = [samples[i] for i in range(b, min(b + batch_size, stop))]
      items += encode_samples(model, processor, batch, **encode_kwargs)
    writer.write_shard(shard, items)
    logging.info("%s: wrote shard %d (samples %d..%d)", writer.path, shard, start, stop - 1)
  return writer.finalize()


def main(argv: list[str]) -> None:
  del argv
  samples = RecordReader(_SAMPLES.value)
  model, processor = encode.load_vlm(_CHECKPOINT.value, _DEVICE.value, _DTYPE.value)
  meta = FeatureMeta(
    model_id=_MODEL_ID.value or os.path.basename(os.path.normpath(_CHECKPOINT.value)),
    prompt_template=prompts.prompt_template(_REASONING.value),
    dtype=_STORE_DTYPE.value,
    hidden_size=model.config.text_config.hidden_size,
  )
  layout = StoreLayout(len(samples), _NUM_WORKERS.value, _SHARD_SIZE.value)
  writer = FeatureWriter(_OUT.value, meta, layout, _WORKER_INDEX.value)
  done = precompute(
    model,
    processor,
    samples,
    writer,
    _BATCH_SIZE.value,
    reasoning=_REASONING.value,
    max_new_tokens=_MAX_NEW_TOKENS.value,
    max_pixels=_MAX_PIXELS.value,
  )
  if not done:
    logging.info(
      "%s: worker %d done; other workers' shards are missing", _OUT.value, _WORKER_INDEX.value
    )
    return
  if FeatureReader(_OUT.value).ids() != samples.ids():
    raise FeatureError(f"{_OUT.value}: feature ids are not those of {_SAMPLES.value} in order")
  logging.info("%s: complete, %d samples", _OUT.value, len(samples))


if __name__ == "__main__":
  app.run(main)
