"""Qwen2.5-VL (PyTorch, transformers) as the frozen instruction encoder of GenMask.

Loads any Qwen2.5-VL checkpoint directory without the hub, runs prompts in batches and returns
per-prompt final-layer hidden states without padding or the chat prefix (see `prompts`).
`encode_samples` turns sample records into features the one way both the offline stage
(launch/precompute_vlm.py) and inference's in-process VLM use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from absl import logging
from PIL import Image
from transformers import (
  AutoImageProcessor,
  AutoTokenizer,
  Qwen2_5_VLForConditionalGeneration,
  Qwen2_5_VLProcessor,
)

from genmask_jax.data import tasks
from genmask_jax.data.features import FeatureItem, FeatureWriter
from genmask_jax.data.records import decode_image
from genmask_jax.vlm import image_policy, prompts
from genmask_jax.vlm.image_policy import ImagePolicy

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageTextProcessor(Qwen2_5_VLProcessor):
  """The Qwen2.5-VL processor without a video processor (which needs torchvision)."""

  def check_argument_for_proper_class(self, argument_name, argument):
    if argument_name == "video_processor" and argument is None:
      return None
    return super().check_argument_for_proper_class(argument_name, argument)


class Prompt(NamedTuple):
  messages: list[dict]  # Chat messages; an {"type": "image"} part takes `image`.
  image: Image.Image | None


def load_vlm(checkpoint_dir: str, device: str = "cpu", dtype: str = "float32"):
  """(model, processor) from a local Qwen2.5-VL checkpoint directory; the model in eval mode."""
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"{checkpoint_dir}: not a checkpoint directory")
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
    checkpoint_dir, dtype=TORCH_DTYPES[dtype]
  )
  tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
  if tokenizer.chat_template is None:
    raise ValueError(f"{checkpoint_dir}: the tokenizer has no chat template")
  processor = make_processor(tokenizer, AutoImageProcessor.from_pretrained(checkpoint_dir))
  return model.to(device).eval(), processor


def make_processor(tokenizer, image_processor) -> ImageTextProcessor:
  """The processor of a tokenizer (with the chat template) and a Qwen2-VL image processor."""
  return ImageTextProcessor(
    image_processor=image_processor,
    tokenizer=tokenizer,
    video_processor=None,
    chat_template=tokenizer.chat_template,
  )


def _model_inputs(model, processor, batch: Sequence[Prompt], padding_side: str, max_pixels):
  texts = [
    processor.tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
    for p in batch
  ]
  images = [p.image for p in batch if p.image is not None]
  image_kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
  inputs = processor(
    text=texts,
    images=images or None,
    padding=True,
    padding_side=padding_side,
    return_tensors="pt",
    **image_kwargs,
  )
  return inputs.to(model.device), texts


@torch.no_grad()
def encode_prompts(
  model, processor, batch: Sequence[Prompt], max_pixels: int | None = None
) -> list[np.ndarray]:
  """Per prompt: (L_kept, hidden) float32 final-layer hidden states of the kept tokens."""
  inputs, texts = _model_inputs(model, processor, batch, "right", max_pixels)
  hidden = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
  prefix = torch.tensor(prompts.chat_prefix_ids(processor.tokenizer), device=hidden.device)
  features = []
  for i, text in enumerate(texts):
    attended = inputs["attention_mask"][i].bool()
    ids = inputs["input_ids"][i][attended]
    if ids.shape[0] <= prefix.shape[0] or not torch.equal(ids[: prefix.shape[0]], prefix):
      raise ValueError(f"prompt {text!r} does not start with the chat prefix {prefix.tolist()}")
    features.append(hidden[i][attended][prefix.shape[0] :].cpu().numpy())
  return features


@torch.no_grad()
def generate_text(
  model, processor, batch: Sequence[Prompt], max_new_tokens: int, max_pixels: int | None = None
) -> list[str]:
  """Greedy answers of the VLM to the prompts, special tokens removed and stripped."""
  inputs, _ = _model_inputs(model, processor, batch, "left", max_pixels)
  out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
  new_tokens = out[:, inputs["input_ids"].shape[1] :]
  return [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def sample_image(sample: dict, policy: ImagePolicy = image_policy.DEFAULT) -> Image.Image:
  """A segmentation record's image as the VLM is given it."""
  return policy.apply(decode_image(sample))


def rewrite_targets(
  model, processor, samples: Sequence[dict], max_new_tokens: int, policy: ImagePolicy
) -> list[str]:
  """Reasoning mode, first stage: the VLM's explicit target description of each query."""
  batch = [Prompt(prompts.rewrite_messages(s["text"]), sample_image(s, policy)) for s in samples]
  rewrites = generate_text(model, processor, batch, max_new_tokens, policy.max_pixels)
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
  policy: ImagePolicy = image_policy.DEFAULT,
) -> list[FeatureItem]:
  """Feature items of sample-store records (genmask_jax/data/records.py), in order:
  segmentation samples as their image (through `policy`) and instruction, the target first
  rewritten by the VLM in reasoning mode; generation samples as the caption alone."""
  for s in samples:
    if s["task"] not in tasks.NAMES:
      raise ValueError(f"sample {s['id']!r}: task {s['task']!r} is not one of {tasks.NAMES}")
  texts = [s["text"] for s in samples]
  seg = [i for i, s in enumerate(samples) if s["task"] == "segmentation"]
  if reasoning and seg:
    rewrites = rewrite_targets(model, processor, [samples[i] for i in seg], max_new_tokens, policy)
    for i, rewrite in zip(seg, rewrites, strict=True):
      texts[i] = rewrite
  batch = [
    Prompt(prompts.segmentation_messages(text), sample_image(s, policy))
    if s["task"] == "segmentation"
    else Prompt(prompts.generation_messages(text), None)
    for s, text in zip(samples, texts, strict=True)
  ]
  hidden = encode_prompts(model, processor, batch, policy.max_pixels)
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

  Images go through the image policy the store's metadata records. Batches never cross shard
  boundaries, so a resumed run computes exactly what an uninterrupted one would have.
  """
  policy = image_policy.from_record(writer.meta.image_policy)
  for shard, start, stop in writer.pending_shards():
    items = []
    for b in range(start, stop, batch_size):
      batch = [samples[i] for i in range(b, min(b + batch_size, stop))]
      items += encode_samples(model, processor, batch, policy=policy, **encode_kwargs)
    writer.write_shard(shard, items)
    logging.info("%s: wrote shard %d (samples %d..%d)", writer.path, shard, start, stop - 1)
  return writer.finalize()
