"""GenMask training: `--config=configs/genmask.py:SIZE`, SIZE in 1.3b | 14b | mid | small | tiny.

1.3b (the default) is the paper's recipe: the WAN-2.1 1.3B DiT fine-tuned end to end on
segmentation and generation data mixed 1:1, global batch 1024, 8000 steps, AdamW with cosine
decay 5e-5 -> 1e-5. 14b is the same recipe on WAN-2.1's 14B DiT. The smaller sizes serve
benchmarks and tests.
"""

from __future__ import annotations

import ml_collections

from configs import data, models

# The accelerator presets' memory settings: what `python -m launch.compile --search` chose for the
# paper's global batch (the least recomputation that fits with 10% of HBM free; README "Will it
# fit?" gives the slices they were compiled for).
MEMORY_SETTINGS = {
  "1.3b": dict(remat_policy="dots_attention", microbatches=2),
  "14b": dict(remat_policy="dots_attention", microbatches=2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "1.3b"
  config = ml_collections.ConfigDict()
  config.seed = 0  # Initialization, noise and (config.data.seed) data order.
  config.dit = models.wan_dit(size)
  config.vae = models.wan_vae(models.VAE_OF_DIT[size])
  # Folders written by launch/convert_wan.py; empty: random initialization.
  config.init = dict(weights="", vae_weights="")

  config.diffusion = dict(
    timesteps=dict(
      segmentation=dict(kind="logit_normal", loc=0.0, scale=1.0, shift=0.05),
      generation=dict(kind="logit_normal", loc=0.0, scale=1.0, shift=1.0),
    ),
    segmentation_loss="mse",  # mse | vae_bce | linear_bce (paper Tab. 4)
    text_dropout=0.1,  # Generation samples only, for classifier-free guidance.
    use_condition_tokens=True,  # The clean image latent as extra tokens (paper Tab. 6).
  )

  # One-step segmentation (paper Eq. 8) and image generation (Euler, WAN's shifted schedule).
  # decoder: vae | linear; steps > 1: Euler steps from t to 0 (benchmarks/one_step.py).
  config.segment = dict(t=1.0, noise="gaussian", seed=0, decoder="vae", steps=1)
  # gather_weights: the sampler gathers the DiT's weights over fsdp once per call, before its
  # Euler loop, so that each chip holds the whole (bf16) DiT while it samples; False keeps them
  # sharded, and every step then moves weights or partial activations between chips.
  config.generate = dict(num_steps=50, shift=5.0, guidance_scale=5.0, gather_weights=True)

  # Sample and feature stores: see launch/prepare_data.py and launch/precompute_vlm.py.
  config.data = data.default_config()
  config.data.seed = config.get_ref("seed")
  # The paper's batch of 1024: 512 segmentation + 512 generation samples per step, whatever
  # the number of hosts (each reads global_batch_size / process_count of each).
  config.data.segmentation.global_batch_size = 512
  config.data.generation.global_batch_size = 512

  # Evaluation (`--mode=eval`, and every `every_steps` training steps when > 0). A split:
  # dict(name=, records=, features=, reasoning=False, breakdown="" or "is_sentence").
  config.eval = dict(batch_size=8, every_steps=0, num_overlays=8, overlay_tile=256, splits=[])

  config.total_steps = 8000
  # Gradient accumulation: each task's global batch is taken in this many parts, one after the
  # other, for the same update in a part's activation memory (launch/compile.py --search).
  config.microbatches = 1
  if size in MEMORY_SETTINGS:
    config.dit.remat_policy = MEMORY_SETTINGS[size]["remat_policy"]
    config.microbatches = MEMORY_SETTINGS[size]["microbatches"]
  config.optimizer = dict(
    lr=5e-5,
    min_lr=1e-5,
    warmup_steps=250,
    total_steps=config.get_ref("total_steps"),
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    grad_clip=1.0,
    ema_decay=0.0,  # > 0: evaluate and serve a moving average of the weights (not the paper's).
  )
  # One slice's shape (-1: all remaining devices); slices -1: the TPU slices the job runs on (1 off
  # TPU; a count > 1 there makes each process a slice). Data parallelism spans the slices.
  config.mesh = dict(data=1, fsdp=-1, tensor=1, slices=-1)
  config.checkpoint = dict(every=500, keep=3, async_save=True)
  config.log_every = 50
  return config
