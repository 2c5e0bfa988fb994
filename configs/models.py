"""Model presets shared by the config files: the WAN-2.1 DiT and VAE at several sizes."""

from __future__ import annotations

import ml_collections

from genmask_jax.models.splash_tiles import SPLASH_BLOCK_SIZES

# WAN-2.1 T2V-1.3B, text width 3584 (Qwen2.5-VL-7B final hidden states instead of umT5's 4096).
_DIT_1P3B = dict(
  patch_size=(1, 2, 2),
  in_dim=16,
  out_dim=16,
  dim=1536,
  ffn_dim=8960,
  freq_dim=256,
  num_heads=12,
  num_layers=30,
  eps=1e-6,
  text_dim=3584,
)

_DIT_SIZES = {
  "1.3b": {},
  # WAN-2.1 T2V-14B.
  "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
  # CPU benchmarks (benchmarks/dit_cpu.py, gpu.py --mid).
  "mid": dict(dim=512, ffn_dim=1536, num_heads=4, num_layers=8, freq_dim=256, text_dim=512),
  # Demo and integration tests.
  "small": dict(dim=128, ffn_dim=256, num_heads=2, num_layers=4, freq_dim=64, text_dim=64),
  # Unit and parity tests.
  "tiny": dict(dim=64, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=32),
}


# The accelerator presets compute in bf16 (parameters stay fp32); the small ones serve CPU tests.
ACCELERATOR_SIZES = ("1.3b", "14b")


def wan_dit(size: str = "1.3b") -> ml_collections.ConfigDict:
  """Keyword arguments of `genmask_jax.models.dit.WanDiT` for a preset size."""
  if size not in _DIT_SIZES:
    raise ValueError(f"unknown DiT size {size!r}; choose from {sorted(_DIT_SIZES)}")
  cfg = dict(_DIT_1P3B, **_DIT_SIZES[size])
  cfg.update(
    use_text_mask=False,  # False reproduces WAN's unmasked zero padding.
    cond_frame_start=-1,  # RoPE frame of the condition tokens; -1: right after the noisy frames.
    # Compute dtype; parameters stay fp32.
    dtype="bfloat16" if size in ACCELERATOR_SIZES else "float32",
    # auto: the target's kernel (splash on TPU, cudnn on GPU in bf16, else xla) | xla | jax_xla |
    # cudnn | splash
    attention="auto",
    attention_block_sizes=dict(SPLASH_BLOCK_SIZES),  # splash tiles
    # none | full | dots | dots_no_batch | save_attention | save_attention_ffn | dots_attention
    remat_policy="none",
    # Layers per iteration of the layer scan; num_layers unrolls it into straight-line code.
    scan_unroll=1,
  )
  return ml_collections.ConfigDict(cfg)


# The WAN-2.1 VAE; only base_dim changes between sizes.
_VAE_BASE_DIM = {"wan2.1": 96, "small": 16, "tiny": 8}
# The VAE each DiT size is paired with (configs/genmask.py:SIZE, benchmarks/gpu.py).
VAE_OF_DIT = {"1.3b": "wan2.1", "14b": "wan2.1", "mid": "small", "small": "small", "tiny": "tiny"}


def wan_vae(size: str = "wan2.1") -> ml_collections.ConfigDict:
  """Keyword arguments of the WAN VAE (image path) for a preset size."""
  if size not in _VAE_BASE_DIM:
    raise ValueError(f"unknown VAE size {size!r}; choose from {sorted(_VAE_BASE_DIM)}")
  return ml_collections.ConfigDict(
    dict(
      base_dim=_VAE_BASE_DIM[size],
      z_dim=16,
      dim_mult=(1, 2, 4, 4),
      num_res_blocks=2,
      dtype="float32",
    )
  )
