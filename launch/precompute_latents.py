r"""Encodes training sample stores with the frozen VAE into latent stores (JAX, offline).

  python -m launch.precompute_latents --config=configs/genmask.py \
      --config.init.vae_weights=weights/wan21 --num_workers=8 --worker_index=0

Every source of data.segmentation and data.generation that names a "latents" directory is
encoded there at its task's resolution (genmask_jax/data/latents.py), unless already complete.
Training then reads those latents instead of running the VAE encoder in every step, and refuses
a store that another VAE or VAE config encoded. Worker i of n encodes the i-th contiguous slice
of each sample store; re-running the same command skips the slices already written.

On a GPU host, --gpus=all (or --gpus=0,1, or --gpus=cpu:N) runs one worker per device and waits
(launch/fanout.py); a multi-node job adds --num_nodes=M --node_index=k on each node
(launch/slurm_gpu.py --job=precompute_latents). On a TPU VM one process drives every chip: run one
worker per host with --num_workers/--worker_index instead.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from genmask_jax.data import latents
from genmask_jax.data.encode_latents import precompute
from genmask_jax.data.features import StoreLayout
from genmask_jax.data.records import TASKS, RecordReader
from genmask_jax.runtime import fileio, log_filter
from launch import fanout

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Workers sharing each sample store.")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This worker, in [0, num_workers).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per VAE call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(latents.STORE_DTYPES), "Stored dtype.")
_FANOUT = fanout.define_flags()


def worker_sizes(config: ml_collections.ConfigDict, num_workers: int) -> dict[str, list[int]]:
  """Per latent store of the config: the samples of each worker's slice."""
  sources = [s for t in TASKS for s in config.data[t].sources if s.get("latents")]
  sizes = {}
  for source in sources:
    layout = StoreLayout(len(RecordReader(source["records"])), num_workers, 1)
    sizes[source["latents"]] = [b - a for a, b in map(layout.worker_range, range(num_workers))]
  return sizes


def fan_out(config: ml_collections.ConfigDict) -> None:
  """Runs this node's workers, one per device of --gpus (launch/fanout.py)."""
  devices, num_workers, indices = fanout.plan(_FANOUT)
  stores = worker_sizes(config, num_workers)

  def finished() -> dict[str, set[int]]:
    """Per store, the workers done: a worker's ids file is written last."""
    ids_file = lambda out, w: os.path.basename(latents._file(out, "ids", w, num_workers, "json"))
    listed = {out: set(fileio.listdir(out)) for out in stores}
    return {
      out: {w for w in range(num_workers) if ids_file(out, w) in listed[out]} for out in stores
    }

  def done() -> int:
    return sum(stores[out][w] for out, ws in finished().items() for w in ws)

  argv = [sys.executable, "-m", "launch.precompute_latents", *fanout.forwarded_argv(sys.argv[1:])]
  before = finished()
  workers = [
    fanout.Worker(w, num_workers, d, argv)
    for w, d in zip(indices, devices, strict=True)
    if not all(w in before[out] for out in stores)
  ]
  total = sum(sum(ns) for ns in stores.values())
  fanout.run(workers, "precompute_latents", _FANOUT.worker_logs.value, total, done)
  for out, workers_done in finished().items():
    complete = len(workers_done) == num_workers
    logging.info("%s: %s", out, "complete" if complete else "other nodes' slices missing")


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  fanout.check_flags()
  if _FANOUT.gpus.value:
    fan_out(_CONFIG.value)
    return
  precompute(
    _CONFIG.value, _WORKER_INDEX.value, _NUM_WORKERS.value, _BATCH_SIZE.value, _DTYPE.value
  )


if __name__ == "__main__":
  app.run(main)
