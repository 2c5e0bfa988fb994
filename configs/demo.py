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
  # Straight-line layers: a scan's stacked activations cost ~20% of a CPU step in copies.
  config.dit.scan_unroll = config.dit.get_ref("num_layers")
  # One downsampling stage fewer than WAN's: 64x64 masks become 16x16 latents, which this
  # small VAE reconstructs to ~0.94 IoU (8x8 latents: ~0.85, a ceiling for the whole demo).
  config.vae.update(base_dim=8, dim_mult=(1, 2, 4))

  config.data.encoder_model_id = "tiny_qwen"  # The tiny random Qwen2.5-VL the demo builds.
  config.data.text_len = 40  # The longest prompt has 31 tokens; padding costs cross-attention.
  config.data.num_threads = 4
  for task in ("segmentation", "generation"):
    config.data[task].resolution = 64
    config.data[task].global_batch_size = 8

  # Generation trains on the noise levels it samples at: WAN's shift 3 (odds / 3 here, as in
  # config.generate) instead of the paper's unshifted logit-normal. Layout and colours are set at
  # high noise; named-colour recall 0.63 -> 0.69 / 0.70 on seeds 1 / 2 (guidance 3; README).
  config.diffusion.timesteps.generation.shift = 1 / 3
  # 4000 steps for time: the whole demo takes 11.8 min on 2 cores (15.4 before XLA's buffers got
  # huge pages, runtime/host_memory.py; 4500 steps then: 16.0 min); held-out mIoU 0.844 -> 0.828
  # and colour recall 0.692 -> 0.681 (guidance 3), means of three seeds (README).
  config.total_steps = 4000
  config.optimizer.update(lr=3e-3, min_lr=1e-5, warmup_steps=100, b2=0.95)
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  config.checkpoint = dict(every=500, keep=2, async_save=True)
  config.log_every = 100
  config.eval.update(batch_size=32, num_overlays=12, overlay_tile=128)
  # Light guidance: stronger guidance draws fewer of the named shapes. Named-colour recall 0.681 at
  # guidance 3 -> 0.735 at 1.5 (precision 0.977 -> 0.950), means of three seeds (README).
  config.generate.update(num_steps=25, shift=3.0, guidance_scale=1.5)

  # The demo's own stages (launch/demo.py).
  config.demo = dict(
    num_train=3000,
    num_gen=3000,
    num_heldout=256,
    num_generate=128,  # Images generated from held-out captions (the first 8 in the grid).
    num_eval_train=256,  # Training samples evaluated too, to show fit next to generalization.
    image_size=64,
    # Many steps on small windows. 4800 steps: mask round-trip IoU 0.996 on held-out masks and
    # every named colour kept on 256 scenes (2400: 0.967 and 0.78, colours off by ~70 RGB;
    # 400 steps on 32x32 windows, the same time: 0.871, which capped the whole demo).
    vae_steps=4800,
    vae_batch_size=16,
    vae_lr=2e-3,
    vae_crop=16,  # Random 16x16 windows (4x4 latents): a sixteenth of the cost per step.
    vae_statistics_samples=1024,  # At least this many images and masks give the latent stats.
  )
  return config
