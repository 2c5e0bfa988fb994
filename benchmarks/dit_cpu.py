"""Our DiT forward against diffusers' WanTransformer3DModel on the same weights and inputs (CPU).

  python -m benchmarks.dit_cpu --size=mid --tokens=1024 --repeats=5

Builds the diffusers model with random weights, converts it with our converter, checks parity
on the condition-token path (N noisy + N clean tokens, t = 0 on the clean ones) and times one
forward pass of each, after warm-up, in fp32.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import torch
from absl import app, flags

from benchmarks.timing import median_seconds
from configs.models import wan_dit
from genmask_jax.conversion.dit import convert_dit_file, diffusers_kwargs
from genmask_jax.models.dit import WanDiT


def reference_model(cfg):
  import diffusers

  model = diffusers.WanTransformer3DModel(**diffusers_kwargs(cfg))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.02 if p.ndim > 1 else 0.1)
  return model.eval()


flags.DEFINE_string("size", "mid", "DiT preset of configs/models.py")
flags.DEFINE_integer("tokens", 1024, "noisy tokens (= condition tokens)")
flags.DEFINE_integer("text_len", 64, "Text length in tokens.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions.")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS

  cfg = wan_dit(args.size)
  side = int(round(args.tokens**0.5))
  if side * side != args.tokens:
    raise SystemExit("--tokens must be a square number")
  ref = reference_model(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "diffusion_pytorch_model.safetensors")
    ref.save_pretrained(tmp, safe_serialization=True)
    params, _ = convert_dit_file(path, cfg)

  rng = np.random.default_rng(0)
  latent = (1, 1, 2 * side, 2 * side, cfg.in_dim)
  x = rng.standard_normal(latent).astype(np.float32)
  cond = rng.standard_normal(latent).astype(np.float32)
  context = rng.standard_normal((1, args.text_len, cfg.text_dim)).astype(np.float32)
  t = np.array([700.0], np.float32)

  model = WanDiT(**cfg.to_dict())
  forward = jax.jit(lambda p, x, t, c, cond: model.apply({"params": p}, x, t, c, cond=cond))
  args_jax = [jax.device_put(a) for a in (params, x, t, context, cond)]
  ours = lambda: forward(*args_jax).block_until_ready()

  x_ref = torch.from_numpy(np.concatenate([x, cond], 1).transpose(0, 4, 1, 2, 3).copy())
  t_ref = torch.from_numpy(np.repeat([[700.0, 0.0]], args.tokens, axis=1).reshape(1, 2, -1))
  t_ref = t_ref.reshape(1, 2 * args.tokens).float()
  c_ref = torch.from_numpy(context)

  def theirs():
    with torch.no_grad():
      return ref(
        hidden_states=x_ref, timestep=t_ref, encoder_hidden_states=c_ref, return_dict=False
      )[0]

  diff = np.abs(np.asarray(ours()) - theirs().numpy().transpose(0, 2, 3, 4, 1)[:, :1]).max()
  t_ours, t_theirs = median_seconds(ours, args.repeats), median_seconds(theirs, args.repeats)
  print(f"device: {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}")
  print(
    f"DiT {args.size}: {cfg.num_layers} layers, dim {cfg.dim}, "
    f"{args.tokens} noisy + {args.tokens} condition tokens"
  )
  print(f"parity max |ours - diffusers| = {diff:.2e}")
  print(
    f"forward: ours {t_ours * 1e3:.1f} ms, diffusers {t_theirs * 1e3:.1f} ms, "
    f"ratio ours/diffusers = {t_ours / t_theirs:.2f}"
  )


if __name__ == "__main__":
  app.run(main)
