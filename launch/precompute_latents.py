r"""Encodes training sample stores with the frozen VAE into latent stores (JAX, offline).

  python -m launch.precompute_latents --config=configs/genmask.py \
      --config.init.vae_weights=weights/wan21 --num_workers=8 --worker_index=0

Every source of data.segmentation and data.generation that names a "latents" directory is
encoded there at its task's resolution (genmask_jax/data/latents.py), unless already complete.
Training then reads those latents instead of running the VAE encoder in every step, and refuses
a store that another VAE or VAE config encoded. Worker i of n encodes the i-th contiguous slice
of each sample store; re-running the same command skips the slices already written.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from genmask_jax import log_filter
from genmask_jax.data import latents
from genmask_jax.encode_latents import precompute

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Workers sharing each sample store.")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This worker, in [0, num_workers).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per VAE call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(latents.STORE_DTYPES), "Stored dtype.")


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  precompute(
    _CONFIG.value, _WORKER_INDEX.value, _NUM_WORKERS.value, _BATCH_SIZE.value, _DTYPE.value
  )


if __name__ == "__main__":
  app.run(main)
