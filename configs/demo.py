"""The CPU demo: the whole GenMask recipe at toy scale on the synthetic shapes set.

Used by `python -m launch.demo`; every field can be overridden with --config.x=y. The DiT and
the VAE are small and trained from scratch here (no pretrained weights can be downloaded); the
recipe is the paper's (segmentation and generation mixed 1:1, the s = 0.05 segmentation
sampler, MSE in latent space, condition tokens from the image latent, CFG text dropout) but for
the generation sampler's shift, below.
"""

from __future__ import annotations

import ml_collections

from configs.genmask import get_config as genmask_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = genmask_config("small")
  config.dit.update(dim=128, ffn_dim=384, num_heads=4, num_layers=4, text_dim=64)
  config.dit.use_text_mask = True  # Attend to real text tokens only.
  # Straight-line layers: on a CPU a scan's stacked activations cost buffer copies every step.
  config.dit.scan_unroll = config.dit.get_ref("num_layers")
  # One downsampling stage fewer than WAN's: 64x64 masks become 16x16 latents; 8x8 latents lose
  # the masks' shapes, a ceiling for the whole demo (docs/results.md).
  config.vae.update(base_dim=8, dim_mult=(1, 2, 4))

  config.data.encoder_model_id = "tiny_qwen"  # The tiny random Qwen2.5-VL the demo builds.
  config.data.text_len = 40  # The longest prompt has 31 tokens; padding costs cross-attention.
  config.data.num_threads = 4
  for task in ("segmentation", "generation"):
    config.data[task].resolution = 64
    config.data[task].global_batch_size = 8

  # Generation trains on the noise levels it samples at: WAN's shift 3 (odds / 3 here, as in
  # config.generate) instead of the paper's unshifted logit-normal. Layout and colours are set at
  # high noise, so more of the named colours are drawn (docs/results.md).
  config.diffusion.timesteps.generation.shift = 1 / 3
  # Steps for the time budget: the whole demo within 15 minutes on 2 CPU cores; 500 more steps
  # buy little (docs/results.md).
  config.total_steps = 4000
  config.optimizer.update(lr=3e-3, min_lr=1e-5, warmup_steps=100, b2=0.95)
  config.mesh = dict(data=1, fsdp=-1, tensor=1, slices=-1)
  config.checkpoint = dict(every=500, keep=2, async_save=True)
  config.log_every = 100
  config.eval.update(batch_size=32, num_overlays=12, overlay_tile=128)
  # Light guidance: stronger guidance draws fewer of the named shapes (docs/results.md).
  config.generate.update(num_steps=25, shift=3.0, guidance_scale=1.5)

  # The demo's own stages (launch/demo.py).
  config.demo = dict(
    num_train=3000,
    num_gen=3000,
    num_heldout=256,
    num_generate=128,  # Images generated from held-out captions (the first 8 in the grid).
    num_eval_train=256,  # Training samples evaluated too, to show fit next to generalization.
    image_size=64,
    # Many steps on small windows, so that masks and the scenes' colours survive the round trip
    # (benchmarks/demo_vae.py measures it; docs/results.md).
    vae_steps=4800,
    vae_batch_size=16,
    vae_lr=2e-3,
    vae_crop=16,  # Random 16x16 windows (4x4 latents): a sixteenth of the cost per step.
    vae_statistics_samples=1024,  # At least this many images and masks give the latent stats.
  )
  return config
