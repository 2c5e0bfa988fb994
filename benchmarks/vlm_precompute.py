r"""The offline Qwen2.5-VL stage on one device: samples/s, image tokens, bytes per stored sample.

  python -m benchmarks.vlm_precompute --device=cuda       # 7B architecture, random bf16 weights
  python -m benchmarks.vlm_precompute --analytic          # 7B sizes only, no model (any machine)
  python -m benchmarks.vlm_precompute --tiny              # the tiny Qwen2.5-VL on CPU (CI)

The model is Qwen2.5-VL-7B-Instruct's architecture (`tiny_qwen.qwen25_vl_7b_config`, 8.3B
parameters) with random weights in the compute dtype and the tiny tokenizer: nothing is
downloaded. The work is the real stage, `genmask_jax/vlm/encode.precompute`: a sample store of
synthetic 640x480 JPEG images with RefCOCO-length expressions (2-9 words, mean ~5: RefCOCO and
RefCOCO+ average ~3.5, RefCOCOg ~8.4) is decoded, run through the processor (images resized to
at most --max_pixels) and the model, and written as a feature store. Each batch size is timed on
a fresh store after a warm-up batch. One process drives one device: the samples/s are per GPU,
and `launch/precompute_vlm.py --gpus=all` runs one such process per GPU.

Bytes per sample: measured from the store's files, and the analytic figure (kept tokens x hidden
size x 2 bytes for bf16) for the configured architecture, which --analytic prints without a
model. The tiny tokenizer splits these expressions into whole words, as Qwen's does.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
import torch
from absl import app, flags
from PIL import Image

from genmask_jax.data import records
from genmask_jax.data.features import FeatureMeta, FeatureWriter, StoreLayout
from genmask_jax.vlm import encode, image_policy, prompts, tiny_qwen

IMAGE_SIZE = (480, 640)  # (height, width): COCO's most common size.
_COLORS = ("red", "white", "black", "blue", "green", "brown", "gray", "yellow")
_THINGS = ("man", "woman", "dog", "car", "chair", "cup", "horse", "bus", "tree", "bird", "person")
_PLACES = ("on the left", "on the right", "in the middle", "near the table", "on the grass")
PRESETS = {
  "7b": dict(samples=64, batch_sizes=(1, 8, 16, 32), dtype="bfloat16"),
  "tiny": dict(samples=8, batch_sizes=(1, 4), dtype="float32"),
}


def expression(rng: np.random.Generator) -> str:
  """A RefCOCO-like referring expression of 2 to 9 words."""
  words = [str(rng.choice(_COLORS)), str(rng.choice(_THINGS))]
  if rng.random() < 0.6:
    words.append(str(rng.choice(_PLACES)))
  if rng.random() < 0.3:
    words += ["with", "a", str(rng.choice(_COLORS)), str(rng.choice(_THINGS))]
  return " ".join(words)


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
  """A smooth 640x480 photo-like image (JPEG, as COCO's are) with some noise."""
  h, w = IMAGE_SIZE
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  phase = rng.random(3) * 6.0
  image = np.stack([np.sin(4 * x + 3 * y + p) for p in phase], -1) * 90 + 128
  image += rng.normal(0, 12, image.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def write_samples(path: str, count: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  mask = np.zeros(IMAGE_SIZE, np.uint8)
  with records.RecordWriter(path, shard_size=count) as writer:
    for i in range(count):
      writer.write(
        records.make_sample(
          sample_id=f"b{i:06d}",
          task="segmentation",
          image=synthetic_jpeg(rng),
          text=expression(rng),
          source={},
          mask=mask,
        )
      )


def image_tokens(processor, max_pixels: int) -> int:
  """LLM tokens of one 640x480 image: 14x14 patches, merged 2x2, after the max_pixels resize."""
  image = Image.new("RGB", IMAGE_SIZE[::-1])
  grid = processor.image_processor(images=[image], max_pixels=max_pixels)["image_grid_thw"]
  return int(np.prod(np.asarray(grid)[0])) // processor.image_processor.merge_size**2


def kept_tokens(processor, samples: records.RecordReader, max_pixels: int) -> list[int]:
  """Stored rows per sample: the prompt's tokens after the fixed chat prefix (prompts.py)."""
  prefix = len(prompts.chat_prefix_ids(processor.tokenizer))
  counts = []
  for sample in samples:
    messages = prompts.segmentation_messages(sample["text"])
    text = processor.tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True
    )
    image = encode.sample_image(sample)
    inputs = processor(text=[text], images=[image], max_pixels=max_pixels)
    counts.append(len(inputs["input_ids"][0]) - prefix)
  return counts


def store_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def build(config, device: str, dtype: str):
  """The model of `config` with random weights in `dtype`, built on `device` (no download)."""
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(encode.TORCH_DTYPES[dtype])
  try:
    with torch.device(device):  # Initialized where it runs: 16 GiB never pass through the host.
      return Qwen2_5_VLForConditionalGeneration(config).eval()
  finally:
    torch.set_default_dtype(default)


def device_name(device: str) -> str:
  if device.startswith("cuda"):
    return torch.cuda.get_device_name(torch.device(device))
  return f"CPU, {torch.get_num_threads()} torch threads"


def time_batch_size(model, processor, samples, batch_size: int, max_pixels: int, root: str):
  """Seconds to encode and store every sample at this batch size, after a warm-up batch."""
  hidden = model.config.text_config.hidden_size
  policy = image_policy.ImagePolicy(max_pixels=max_pixels).to_record()
  meta = FeatureMeta(
    "benchmark", prompts.prompt_template(), "bfloat16", hidden, image_policy=policy
  )

  def run(out: str, count: int) -> float:
    writer = FeatureWriter(out, meta, StoreLayout(count, 1, count), 0)
    items = [samples[i] for i in range(count)]
    start = time.perf_counter()
    encode.precompute(model, processor, items, writer, batch_size)
    return time.perf_counter() - start

  run(os.path.join(root, f"warmup-{batch_size}"), batch_size)
  out = os.path.join(root, f"batch-{batch_size}")
  return run(out, len(samples)), out


flags.DEFINE_bool("tiny", False, "the tiny Qwen2.5-VL (CPU, CI)")
flags.DEFINE_bool("analytic", False, "7B sizes only, no model")
flags.DEFINE_string("device", "cuda" if torch.cuda.is_available() else "cpu", "torch device.")
flags.DEFINE_string("batch_sizes", None, "comma-separated (default: the preset's)")
flags.DEFINE_integer("samples", None, "samples per batch size (default: preset's)")
flags.DEFINE_integer("max_pixels", 512 * 512, "as precompute_vlm's")
flags.mark_bool_flags_as_mutual_exclusive(["tiny", "analytic"])


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  preset = PRESETS["tiny" if args.tiny else "7b"]
  count = args.samples or preset["samples"]
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []
  batch_sizes = batch_sizes or list(preset["batch_sizes"])
  with tempfile.TemporaryDirectory() as root:
    write_samples(os.path.join(root, "samples"), count)
    samples = records.RecordReader(os.path.join(root, "samples"))
    tokenizer = tiny_qwen.build_tokenizer()
    processor = encode.make_processor(tokenizer, tiny_qwen.image_processor())
    build_config = tiny_qwen.tiny_config if args.tiny else tiny_qwen.qwen25_vl_7b_config
    config = build_config(tokenizer)
    hidden = config.text_config.hidden_size
    kept = kept_tokens(processor, samples, args.max_pixels)
    analytic = np.mean(kept) * hidden * 2  # bf16 rows.
    print(
      f"architecture               {'tiny' if args.tiny else 'Qwen2.5-VL-7B'} (hidden {hidden})"
    )
    print(f"image tokens (640x480)     {image_tokens(processor, args.max_pixels)}")
    print(f"max_pixels                 {args.max_pixels}")
    print(f"stored tokens per sample   {np.mean(kept):.1f} (mean of {count})")
    print(f"analytic bytes/sample      {analytic:.0f}")
    print(f"analytic GB/1M samples     {analytic * 1e6 / 1e9:.1f}")
    if args.analytic:
      return
    model = build(config, args.device, preset["dtype"])
    print(f"device                     {device_name(args.device)}, {preset['dtype']}")
    for batch_size in batch_sizes:
      seconds, out = time_batch_size(model, processor, samples, batch_size, args.max_pixels, root)
      print(f"{f'samples/s at batch {batch_size}':<27}{count / seconds:.3g}")
    measured = store_bytes(out) / count
    print(f"stored bytes/sample        {measured:.0f}")
    print(f"stored GB/1M samples       {measured * 1e6 / 1e9:.1f}")
    if args.device.startswith("cuda"):
      print(f"peak memory (GiB)          {torch.cuda.max_memory_allocated() / 2**30:.1f}")


if __name__ == "__main__":
  app.run(main)
