"""Analytic FLOPs of the DiT and the VAE (2 per multiply-add), and what a remat policy recomputes.

Counted from the configs, as maxtext and maxdiffusion count MFU: XLA's cost analysis counts a
Pallas kernel (splash attention) as free and a layer scan's body once. The per-token time
embedding and elementwise work (norms, modulation, RoPE, softmax) are left out.
"""

from __future__ import annotations

import math

import ml_collections

from genmask_jax.models.vae import spatial_stride

# What a remat policy (models/dit.py) runs again in the backward pass, by the block's matmuls:
# self-attention projections q, k, v, o and its kernel (logits, then weighted values);
# cross-attention q, o, the text's k, v and its kernel; the FFN's two layers. Measured, not
# derived: XLA's count of one block's gradient under each policy with the XLA kernel matches
# these to 2% of the block's forward (tests/test_flops.py). q and k are RMS-normed after their
# projection and saved only after the norm, so the name policies run the projections again.
BLOCK_OPS = ("q", "k", "v", "o", "self_logits", "self_values", "cross_q", "cross_k", "cross_v",
             "cross_logits", "cross_values", "cross_o", "ffn_in", "ffn_out")  # fmt: skip
_KERNEL = ("self_logits", "self_values", "cross_logits", "cross_values")
_LOGITS = ("self_logits", "cross_logits")
RECOMPUTED = {  # Outside the attention kernel.
  "none": (),
  "full": BLOCK_OPS,
  "dots": (),
  "dots_no_batch": (),
  "save_attention": ("q", "k", "ffn_in", "ffn_out"),
  "save_attention_ffn": ("q", "k"),
  "dots_attention": (),
}
# The attention kernel's share, by kernel. XLA's logits and weighted values are batched dots:
# "dots" keeps them, the name policies keep the output but recompute the logits for the
# softmax's gradient. Splash names its residuals (the output and log-sum-exp) like the output:
# the name policies keep them, the dot policies run the kernel again. cuDNN's residuals carry no
# name: any policy runs it again.
RECOMPUTED_KERNEL = {
  "xla": {"dots_no_batch": _KERNEL, "save_attention": _LOGITS,
          "save_attention_ffn": _LOGITS, "dots_attention": _LOGITS},
  "splash": {"dots": _KERNEL, "dots_no_batch": _KERNEL},
  "cudnn": {policy: _KERNEL for policy in RECOMPUTED if policy not in ("none", "full")},
}  # fmt: skip
RECOMPUTED_KERNEL["jax_xla"] = RECOMPUTED_KERNEL["xla"]


def recomputed_ops(policy: str, kernel: str) -> set[str]:
  """The block ops (BLOCK_OPS) that `policy` runs again with the attention `kernel`."""
  return set(RECOMPUTED[policy]) | set(RECOMPUTED_KERNEL[kernel].get(policy, ()))


def block_op_flops(cfg: ml_collections.ConfigDict, tokens: int, text: int) -> dict[str, int]:
  """One block's forward FLOPs by op (BLOCK_OPS) for one sample of `tokens` tokens."""
  d, f = cfg.dim, cfg.ffn_dim
  projection = 2 * tokens * d * d
  text_projection = 2 * text * d * d
  return {
    "q": projection,
    "k": projection,
    "v": projection,
    "o": projection,
    "self_logits": 2 * tokens * tokens * d,
    "self_values": 2 * tokens * tokens * d,
    "cross_q": projection,
    "cross_k": text_projection,
    "cross_v": text_projection,
    "cross_logits": 2 * tokens * text * d,
    "cross_values": 2 * tokens * text * d,
    "cross_o": projection,
    "ffn_in": 2 * tokens * d * f,
    "ffn_out": 2 * tokens * f * d,
  }


def dit_forward_flops(cfg: ml_collections.ConfigDict, tokens: int, noisy: int, text: int) -> int:
  """One sample's DiT forward: `tokens` through the blocks, `noisy` of them through the head,
  `text` text tokens."""
  patch = math.prod(cfg.patch_size)
  embeddings = (
    2 * tokens * patch * cfg.in_dim * cfg.dim  # patch embedding
    + 2 * text * (cfg.text_dim * cfg.dim + cfg.dim * cfg.dim)  # text embedding MLP
    + 2 * noisy * cfg.dim * patch * cfg.out_dim  # head
  )
  return cfg.num_layers * sum(block_op_flops(cfg, tokens, text).values()) + embeddings


def dit_recompute_flops(cfg: ml_collections.ConfigDict, tokens: int, text: int, kernel: str) -> int:
  """One sample's FLOPs that `cfg.remat_policy` runs again in the backward pass, with the
  attention `kernel` (models/attention.py's name, resolved)."""
  ops = block_op_flops(cfg, tokens, text)
  return cfg.num_layers * sum(ops[name] for name in recomputed_ops(cfg.remat_policy, kernel))


def _conv(side: int, kernel: int, c_in: int, c_out: int) -> int:
  """A same-padded conv at `side` x `side` output pixels."""
  return 2 * side * side * kernel * kernel * c_in * c_out


def _residual_block(side: int, c_in: int, c_out: int) -> int:
  shortcut = _conv(side, 1, c_in, c_out) if c_in != c_out else 0
  return _conv(side, 3, c_in, c_out) + _conv(side, 3, c_out, c_out) + shortcut


def _mid_block(side: int, c: int) -> int:
  """Two residual blocks around single-head attention over all side^2 pixels."""
  pixels = side * side
  attention = _conv(side, 1, c, 3 * c) + 2 * 2 * pixels * pixels * c + _conv(side, 1, c, c)
  return 2 * _residual_block(side, c, c) + attention


def vae_encode_flops(cfg: ml_collections.ConfigDict, resolution: int) -> int:
  """One image's WAN VAE encode (convs and the mid-block attention)."""
  side, c = resolution, cfg.base_dim
  total = _conv(side, 3, 3, c)
  for i, mult in enumerate(cfg.dim_mult):
    for _ in range(cfg.num_res_blocks):
      total += _residual_block(side, c, cfg.base_dim * mult)
      c = cfg.base_dim * mult
    if i < len(cfg.dim_mult) - 1:
      side //= 2
      total += _conv(side, 3, c, c)  # Stride-2 conv, counted at its output size.
  head = _conv(side, 3, c, 2 * cfg.z_dim) + _conv(side, 1, 2 * cfg.z_dim, 2 * cfg.z_dim)
  return total + _mid_block(side, c) + head


def vae_decode_flops(cfg: ml_collections.ConfigDict, resolution: int) -> int:
  """One image's WAN VAE decode to `resolution` x `resolution` pixels."""
  mults = tuple(reversed(cfg.dim_mult))
  side, c = resolution // spatial_stride(cfg.dim_mult), cfg.base_dim * mults[0]
  total = _conv(side, 1, cfg.z_dim, cfg.z_dim) + _conv(side, 3, cfg.z_dim, c)
  total += _mid_block(side, c)
  for i, mult in enumerate(mults):
    for _ in range(cfg.num_res_blocks + 1):
      total += _residual_block(side, c, cfg.base_dim * mult)
      c = cfg.base_dim * mult
    if i < len(mults) - 1:
      side *= 2
      total += _conv(side, 3, c, c // 2)  # After nearest x2 upsampling.
      c //= 2
  return total + _conv(side, 3, c, 3)


def noisy_tokens(config: ml_collections.ConfigDict, resolution: int) -> int:
  """Tokens of one image's latent at `resolution`."""
  side = resolution // spatial_stride(config.vae.dim_mult)
  return (side // config.dit.patch_size[1]) * (side // config.dit.patch_size[2])


def _step_tokens(config: ml_collections.ConfigDict, resolution: int) -> tuple[int, int, int]:
  """(noisy tokens, a segmentation sample's tokens, text tokens) of a sample at `resolution`."""
  n = noisy_tokens(config, resolution)
  return n, 2 * n if config.diffusion.use_condition_tokens else n, config.data.text_len


def train_step_flops(
  config: ml_collections.ConfigDict,
  segmentation: int,
  generation: int,
  resolution: int,
  vae_encodes: bool = True,
) -> int:
  """Model FLOPs of one train step on `segmentation` samples (N noisy + N condition tokens) and
  `generation` samples (N tokens): the DiT forward and backward (3x the forward) plus the frozen
  VAE's encodes (a segmentation sample's mask and image, a generation sample's image) unless
  the latents are stored. No recomputation counted."""
  n, seg_tokens, text = _step_tokens(config, resolution)
  dit = segmentation * dit_forward_flops(config.dit, seg_tokens, n, text)
  dit += generation * dit_forward_flops(config.dit, n, n, text)
  encodes = (2 * segmentation + generation) if vae_encodes else 0
  return 3 * dit + encodes * vae_encode_flops(config.vae, resolution)


def train_step_recompute_flops(
  config: ml_collections.ConfigDict,
  segmentation: int,
  generation: int,
  resolution: int,
  kernel: str,
) -> int:
  """What the remat policy adds to `train_step_flops`, with the attention `kernel`."""
  n, seg_tokens, text = _step_tokens(config, resolution)
  recompute = segmentation * dit_recompute_flops(config.dit, seg_tokens, text, kernel)
  return recompute + generation * dit_recompute_flops(config.dit, n, text, kernel)
