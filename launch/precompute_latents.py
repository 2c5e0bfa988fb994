r"""Encodes training sample stores with the frozen VAE into latent stores (JAX, offline).

  python -m launch.precompute_latents --config=configs/genmask.py \
      --config.init.vae_weights=weights/wan21 --num_workers=8 --worker_index=0

Every source of data.segmentation and data.generation that names a "latents" directory is
encoded there at its task's resolution (genmask_jax/training/precompute_latents.py), unless
already complete.
Training then reads those latents instead of running the VAE encoder in every step, and refuses
a store that another VAE or VAE config encoded. Worker i of n encodes the i-th contiguous slice
of each sample store; re-running the same command skips the shards already written.

On a GPU host, --gpus=all (or --gpus=0,1, or --gpus=cpu:N) runs one worker per device and waits
(launch/common/fanout.py); a multi-node job adds --num_nodes=M --node_index=k on each node
(launch/slurm_gpu.py --job=precompute_latents). On a TPU VM one process drives every chip: run one
worker per host with --num_workers/--worker_index instead.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from genmask_jax import config_check
from genmask_jax.data import latents
from genmask_jax.data.records import RecordReader
from genmask_jax.data.store import StoreLayout
from genmask_jax.runtime import log_filter
from genmask_jax.training.precompute_latents import precompute
from launch.common import fanout

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Workers sharing each sample store.")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This worker, in [0, num_workers).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per VAE call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(latents.STORE_DTYPES), "Stored dtype.")
_FANOUT = fanout.define_flags()
flags.adopt_module_key_flags(fanout)  # --help lists --gpus and its flags too.


def fan_out(config: ml_collections.ConfigDict) -> None:
  """Runs this node's workers, one per device of --gpus (launch/common/fanout.py)."""
  devices, num_workers, indices = fanout.plan(_FANOUT)
  layouts = {
    s["latents"]: StoreLayout(len(RecordReader(s["records"])), num_workers, latents.SHARD_SIZE)
    for _, s in latents.latent_sources(config.data)
  }
  argv = [sys.executable, "-m", "launch.precompute_latents", *fanout.forwarded_argv(sys.argv[1:])]
  workers = [fanout.Worker(w, num_workers, d, argv) for w, d in zip(indices, devices, strict=True)]
  fanout.run_store_workers(
    workers, "precompute_latents", _FANOUT.worker_logs.value, latents.KIND, layouts
  )


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  config_check.validate(_CONFIG.value, "model")
  fanout.check_flags()
  if _FANOUT.gpus.value:
    fan_out(_CONFIG.value)
    return
  precompute(
    _CONFIG.value, _WORKER_INDEX.value, _NUM_WORKERS.value, _BATCH_SIZE.value, _DTYPE.value
  )


if __name__ == "__main__":
  app.run(main)
