"""The two ways to turn clean mask latents into per-pixel mask logits (paper Tab. 4, Fig. 6).

"vae":    the frozen VAE decoder renders the latent as a black-and-white image, which becomes
          logits by the image -> mask rule; gradients reach the latent through the decoder,
          never the decoder's parameters.
"linear": a learnable linear map from each latent pixel's 16 channels to the stride x stride
          (WAN: 8 x 8) pixels it covers (mask latents are nearly linearly separable, paper
          Sec. 2.2.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# (vae_params, latents (B, h, w, 16)) -> mask logits (B, 8h, 8w): the VAE decoder followed by
# the decoded-image -> mask-logit rule.
VaeMaskLogitsFn = Callable[[Any, jax.Array], jax.Array]

DECODERS = ("vae", "linear")


def depth_to_space(x: jax.Array, patch: int) -> jax.Array:
  """(B, h, w, patch * patch) -> (B, h * patch, w * patch); channel i * patch + j is the
  pixel at row i, column j of its patch."""
  b, h, w, _ = x.shape
  x = x.reshape(b, h, w, patch, patch).transpose(0, 1, 3, 2, 4)
  return x.reshape(b, h * patch, w * patch)


class LinearMaskHead(nn.Module):
  """Latents (B, h, w, C) -> mask logits (B, stride h, stride w) by one Dense layer per latent
  pixel; `stride` is the VAE's (pixels per latent pixel along each axis)."""

  stride: int = 8

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    logits = nn.Dense(
      self.stride**2,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("latent_channels", "mask_patch")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mask_patch",)),
      name="proj",
    )(latents.astype(jnp.float32))
    return depth_to_space(logits, self.stride)


def decode_mask_logits(
  latents: jax.Array,
  decoder: str,
  *,
  head_params: Any = None,
  vae_params: Any = None,
  vae_mask_logits: VaeMaskLogitsFn | None = None,
) -> jax.Array:
  """Image latents (B, 1, h, w, C) in the DiT layout -> mask logits (B, 8h, 8w)."""
  if latents.ndim != 5 or latents.shape[1] != 1:
    raise ValueError(f"mask latents must be (B, 1, h, w, C) (one frame), got {latents.shape}")
  latents = latents[:, 0]
  if decoder == "vae":
    if vae_params is None or vae_mask_logits is None:
      raise ValueError("mask decoder 'vae' needs vae_params and vae_mask_logits")
    # The VAE is frozen: its parameters get no gradient, the latents do.
    return vae_mask_logits(jax.lax.stop_gradient(vae_params), latents)
  if decoder == "linear":
    if head_params is None:
      raise ValueError(
        "mask decoder 'linear' needs the LinearMaskHead parameters (params['mask_head'])"
      )
    stride = math.isqrt(head_params["proj"]["kernel"].shape[-1])
    return LinearMaskHead(stride).apply({"params": head_params}, latents)
  raise ValueError(f"mask decoder {decoder!r} unknown; expected one of {DECODERS}")
