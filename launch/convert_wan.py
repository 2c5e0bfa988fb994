r"""Converts the public WAN-2.1 weights (DiT and VAE) into this project's Orbax checkpoints.

  python -m launch.convert_wan --config=configs/genmask.py \
      --dit=Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors \
      --vae=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth --out=checkpoints/wan21_init

--dit takes the original WAN file, a diffusers `transformer/` folder or file, or a sharded
`*.safetensors.index.json`; --vae takes `Wan2.1_VAE.pth` or a diffusers `vae/` safetensors.
Every tensor must be used exactly once; the report lists what was set aside and why.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from genmask_jax import config_check
from genmask_jax.conversion import weights
from genmask_jax.conversion.dit import convert_dit_file
from genmask_jax.runtime import fileio, log_filter

_CONFIG = config_flags.DEFINE_config_file("config", "configs/genmask.py", "Model config.")
_DIT = flags.DEFINE_string("dit", None, "DiT checkpoint: file, folder or *.safetensors.index.json.")
_VAE = flags.DEFINE_string("vae", None, "VAE checkpoint: Wan2.1_VAE.pth or diffusers safetensors.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for layers that are re-initialized.")


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  config, out = _CONFIG.value, _OUT.value
  config_check.validate(config, "model")
  if not (_DIT.value or _VAE.value):
    raise app.UsageError("give --dit and/or --vae")
  if fileio.exists(os.path.join(out, weights.RECORD)) and not _OVERWRITE.value:
    raise app.UsageError(f"{out} holds a finished conversion; pass --overwrite to replace it")
  if fileio.exists(out):  # Finished and --overwrite, or left by a failed run: redone.
    logging.info("replacing %s", out)
    fileio.rmtree(out)
  fileio.makedirs(out)
  record = {"config": config.to_dict(), "sources": {}, "set_aside": {}}
  if _DIT.value:
    params, set_aside = convert_dit_file(_DIT.value, config.dit, seed=_SEED.value)
    weights.save(out, "dit", params)
    record["sources"]["dit"], record["set_aside"]["dit"] = _DIT.value, set_aside
  if _VAE.value:
    from genmask_jax.conversion.vae import convert_vae_file

    params, set_aside = convert_vae_file(_VAE.value, config.vae)
    weights.save(out, "vae", params)
    record["sources"]["vae"], record["set_aside"]["vae"] = _VAE.value, set_aside
  weights.write_record(out, record)
  for model, keys in record["set_aside"].items():
    for key, reason in keys.items():
      logging.info("%s: set aside %s (%s)", model, key, reason)
  logging.info("wrote %s", out)


if __name__ == "__main__":
  app.run(main)
