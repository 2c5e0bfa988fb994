r"""Encodes a sample store with a frozen Qwen2.5-VL into a feature store (PyTorch, offline).

  python -m launch.precompute_vlm --samples=data/refcoco_train \
      --checkpoint=Qwen2.5-VL-7B-Instruct --out=features/refcoco_train_qwen7b \
      --num_workers=8 --worker_index=0 --batch_size=16 --device=cuda --dtype=bfloat16

Segmentation samples become the image plus "Please segment the {target} in the image.",
generation samples the caption alone (paper 2.3); the final-layer hidden states of the kept
tokens (genmask_jax/vlm/prompts.py) are stored as bf16/fp16 under the sample id. Several stores
(--samples=a,b --out=fa,fb, in pairs) share one loaded model. Worker i of n encodes the i-th
contiguous slice of each sample store in shards of --shard_size samples; re-running the same
command skips finished shards, and the store is readable once every worker has written its
part (genmask_jax/data/store.py). The image policy (--image_resize, --max_pixels;
genmask_jax/vlm/image_policy.py) is recorded in the store, and inference gives the VLM user
images the same way. --reasoning first asks the VLM to rewrite each segmentation query into an
explicit target description and encodes that.

One command for a whole node (launch/common/fanout.py): --gpus=all (or --gpus=0,1, or
--gpus=cpu:2 for two CPU workers) runs one worker per device with --num_workers/--worker_index
set, waits, shows one progress bar for the store and exits non-zero naming a failed worker;
workers log to --worker_logs.
In a multi-node job every node runs the same command with --num_nodes=M --node_index=k
(launch/slurm_gpu.py --job=precompute_vlm writes that job array).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from genmask_jax.data import features, store
from genmask_jax.data.features import FeatureMeta, FeatureReader, FeatureWriter
from genmask_jax.data.records import RecordReader
from genmask_jax.data.store import StoreLayout
from genmask_jax.runtime import log_filter
from genmask_jax.vlm import encode, image_policy, prompts
from launch.common import fanout

_SAMPLES = flags.DEFINE_list("samples", None, "Sample store directories.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Qwen2.5-VL directory.", required=True)
_OUT = flags.DEFINE_list(
  "out", None, "Feature store directories, one per --samples.", required=True
)
_MODEL_ID = flags.DEFINE_string("model_id", None, "Encoder name recorded; default: dir name.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per forward pass.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 256, "Samples per output shard.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Workers sharing the sample store.")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This worker, in [0, num_workers).")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device: cpu, cuda, cuda:1, ...")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(encode.TORCH_DTYPES), "VLM compute dtype.")
_STORE_DTYPE = flags.DEFINE_enum("store_dtype", "bfloat16", ["bfloat16", "float16"], "Stored.")
_MAX_PIXELS = flags.DEFINE_integer(
  "max_pixels", image_policy.DEFAULT_MAX_PIXELS, "Image area cap for the VLM."
)
_IMAGE_RESIZE = flags.DEFINE_integer(
  "image_resize", 0, "Resize every image to this square side first (0: keep its size)."
)
_REASONING = flags.DEFINE_bool("reasoning", False, "Rewrite segmentation queries first.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Rewrite length cap.")
_FANOUT = fanout.define_flags()
flags.adopt_module_key_flags(fanout)  # --help lists --gpus and its flags too.


def precompute_store(model, processor, samples_dir: str, out_dir: str) -> None:
  """This worker's share of one sample store, and its part of the feature store."""
  samples = RecordReader(samples_dir)
  meta = FeatureMeta(
    model_id=_MODEL_ID.value or os.path.basename(os.path.normpath(_CHECKPOINT.value)),
    prompt_template=prompts.prompt_template(_REASONING.value),
    dtype=_STORE_DTYPE.value,
    hidden_size=model.config.text_config.hidden_size,
    image_policy=image_policy.ImagePolicy(_IMAGE_RESIZE.value, _MAX_PIXELS.value).to_record(),
  )
  layout = StoreLayout(len(samples), _NUM_WORKERS.value, _SHARD_SIZE.value)
  writer = FeatureWriter(out_dir, meta, layout, _WORKER_INDEX.value)
  done = encode.precompute(
    model,
    processor,
    samples,
    writer,
    _BATCH_SIZE.value,
    reasoning=_REASONING.value,
    max_new_tokens=_MAX_NEW_TOKENS.value,
  )
  if not done:
    logging.info(
      "%s: worker %d done; other workers' parts are missing", out_dir, _WORKER_INDEX.value
    )
    return
  store.check_aligned(FeatureReader(out_dir), samples)
  logging.info("%s: complete, %d samples", out_dir, len(samples))


def fan_out() -> None:
  """Runs this node's workers, one per device of --gpus, over every store (common/fanout.py)."""
  devices, num_workers, indices = fanout.plan(_FANOUT)
  layouts = {
    out: StoreLayout(len(RecordReader(s)), num_workers, _SHARD_SIZE.value)
    for s, out in zip(_SAMPLES.value, _OUT.value, strict=True)
  }
  own = (*fanout.FANOUT_FLAGS, "device")
  argv = [sys.executable, "-m", "launch.precompute_vlm", *fanout.forwarded_argv(sys.argv[1:], own)]
  workers = [
    fanout.Worker(w, num_workers, d, [*argv, f"--device={d.torch}"])
    for w, d in zip(indices, devices, strict=True)
  ]
  fanout.run_store_workers(
    workers, "precompute_vlm", _FANOUT.worker_logs.value, features.KIND, layouts
  )


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  if len(_SAMPLES.value) != len(_OUT.value):
    raise app.UsageError(
      f"--samples names {len(_SAMPLES.value)} stores and --out {len(_OUT.value)}; "
      "give one --out per --samples, in the same order"
    )
  fanout.check_flags()
  if _FANOUT.gpus.value:
    fan_out()
    return
  model, processor = encode.load_vlm(_CHECKPOINT.value, _DEVICE.value, _DTYPE.value)
  for samples_dir, out_dir in zip(_SAMPLES.value, _OUT.value, strict=True):
    precompute_store(model, processor, samples_dir, out_dir)


if __name__ == "__main__":
  app.run(main)
