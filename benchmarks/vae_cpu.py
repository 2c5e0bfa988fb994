"""Our VAE encode and decode against diffusers' AutoencoderKLWan on the same weights (CPU).

  python -m benchmarks.vae_cpu --base_dim=96 --size=256 --repeats=3

Builds the diffusers VAE (default initialization), converts it with our converter through a
safetensors file, checks parity on one image and times encode and decode of each (ours jitted,
after warm-up) in fp32.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import numpy as np
import torch
from absl import app, flags

from benchmarks.timing import median_seconds
from configs.models import wan_vae
from genmask_jax.conversion.vae import convert_vae_file
from genmask_jax.models.vae import LATENTS_MEAN, LATENTS_STD, WanVAE

flags.DEFINE_integer("base_dim", 96, "96 is WAN-2.1's VAE")
flags.DEFINE_integer("size", 256, "image side in pixels")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions.")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS

  import diffusers

  cfg = dict(wan_vae(), base_dim=args.base_dim)
  ref = diffusers.AutoencoderKLWan(base_dim=args.base_dim).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp, safe_serialization=True)
    params, _ = convert_vae_file(os.path.join(tmp, "diffusion_pytorch_model.safetensors"), cfg)

  model = WanVAE(**cfg)
  encode = jax.jit(functools.partial(model.apply, method=WanVAE.encode))
  decode = jax.jit(functools.partial(model.apply, method=WanVAE.decode))
  variables = jax.device_put({"params": params})
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
  latents = np.array(encode(variables, images))  # Writable, for torch.from_numpy.

  mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
  std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)
  x_ref = torch.from_numpy(images).permute(0, 3, 1, 2)[:, :, None].contiguous()
  z_ref = torch.from_numpy(latents).permute(0, 3, 1, 2)[:, :, None].contiguous() * std + mean

  @torch.no_grad()
  def theirs_encode():
    return ref.encode(x_ref).latent_dist.mode()

  @torch.no_grad()
  def theirs_decode():
    return ref.decode(z_ref).sample

  to_last = lambda t: t[:, :, 0].permute(0, 2, 3, 1).numpy()
  enc_diff = np.abs(latents - to_last((theirs_encode() - mean) / std)).max()
  dec_diff = np.abs(np.asarray(decode(variables, latents)) - to_last(theirs_decode())).max()

  ours_encode = lambda: encode(variables, images).block_until_ready()
  ours_decode = lambda: decode(variables, latents).block_until_ready()
  times = {
    "encode": (
      median_seconds(ours_encode, args.repeats),
      median_seconds(theirs_encode, args.repeats),
    ),
    "decode": (
      median_seconds(ours_decode, args.repeats),
      median_seconds(theirs_decode, args.repeats),
    ),
  }
  print(f"device: {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}")
  print(f"WAN VAE base_dim {args.base_dim}, batch {args.batch} x {args.size}x{args.size}, fp32")
  print(f"parity max |ours - diffusers|: encode {enc_diff:.2e}, decode {dec_diff:.2e}")
  for name, (ours, theirs) in times.items():
    print(
      f"{name}: ours {ours * 1e3:.0f} ms, diffusers {theirs * 1e3:.0f} ms, "
      f"ratio ours/diffusers = {ours / theirs:.2f}"
    )


if __name__ == "__main__":
  app.run(main)
