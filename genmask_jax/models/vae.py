"""The WAN-2.1 VAE for single images (T = 1), channels-last.

WAN's VAE is a causal 3D network. For one frame every causal conv sees two zero frames in
front of the data, so only the last temporal tap of its kernel contributes: the conv is exactly
a 2D conv with that tap. The temporal resample convs never run for the first (here: only) chunk.
This module is that 2D network, exact for images (WAN-2.1's `wan/modules/vae.py`;
tests/test_vae.py checks it against diffusers' AutoencoderKLWan).

Images are (B, H, W, 3) in [-1, 1] with H and W multiples of the spatial stride s (8 for WAN's
four stages, `2 ** (len(dim_mult) - 1)` in general); latents are (B, H/s, W/s, z_dim), normalized
per channel with WAN's published means and standard deviations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genmask_jax.models.attention import dot_product_attention

f32 = jnp.float32

# Per-channel statistics of WAN-2.1 latents (`wan/modules/vae.py`).
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def conv(features: int, kernel: int, dtype, name: str | None, *, strides: int = 1, padding=None):
  """A 2D conv with fp32 parameters and logical axis names; zero padding kernel // 2 by default."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=strides,
    padding=kernel // 2 if padding is None else padding,
    dtype=dtype,
    param_dtype=f32,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
    ),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )


class RMSNorm(nn.Module):
  """WAN's VAE norm: L2-normalize over channels (norm floored at 1e-12), times sqrt(C) * gamma.

  Computed in fp32, returned in `dtype`.
  """

  dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    gamma = self.param(
      "gamma", nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)), (channels,)
    )
    x = x.astype(f32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, 1e-12) * math.sqrt(channels) * gamma).astype(self.dtype)


class ResidualBlock(nn.Module):
  """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus a 1x1 shortcut if widths differ."""

  features: int
  dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.dtype, "shortcut")(x)
    h = nn.silu(RMSNorm(self.dtype, name="norm1")(x))
    h = conv(self.features, 3, self.dtype, "conv1")(h)
    h = nn.silu(RMSNorm(self.dtype, name="norm2")(h))
    return conv(self.features, 3, self.dtype, "conv2")(h) + shortcut


class AttentionBlock(nn.Module):
  """Single-head self-attention over all pixels, 1x1 convs for qkv and the output."""

  dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    qkv = conv(3 * c, 1, self.dtype, "to_qkv")(RMSNorm(self.dtype, name="norm")(x))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 1, 3 * c), 3, axis=-1)
    out = dot_product_attention(q, k, v).reshape(b, h, w, c)
    return conv(c, 1, self.dtype, "proj")(out) + x


class MidBlock(nn.Module):
  dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ResidualBlock(x.shape[-1], self.dtype, name="res_0")(x)
    x = AttentionBlock(self.dtype, name="attn")(x)
    return ResidualBlock(x.shape[-1], self.dtype, name="res_1")(x)


def _head(x: jax.Array, features: int, dtype) -> jax.Array:
  """The output head shared by encoder and decoder (called inside their compact scope)."""
  x = nn.silu(RMSNorm(dtype, name="norm_out")(x))
  return conv(features, 3, dtype, "conv_out")(x)


class Encoder(nn.Module):
  """Images (B, H, W, 3) -> (B, H/8, W/8, 2 * z_dim) (mean and log-variance)."""

  base_dim: int
  z_dim: int
  dim_mult: Sequence[int]
  num_res_blocks: int
  dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = conv(self.base_dim, 3, self.dtype, "conv_in")(x.astype(self.dtype))
    for i, mult in enumerate(self.dim_mult):
      for j in range(self.num_res_blocks):
        x = ResidualBlock(self.base_dim * mult, self.dtype, name=f"stage_{i}_res_{j}")(x)
      if i < len(self.dim_mult) - 1:
        # WAN pads one zero row/column at the bottom/right before a VALID stride-2 conv.
        down = conv(
          x.shape[-1], 3, self.dtype, f"stage_{i}_down", padding=((0, 1), (0, 1)), strides=2
        )
        x = down(x)
    x = MidBlock(self.dtype, name="mid")(x)
    return _head(x, 2 * self.z_dim, self.dtype)


class Decoder(nn.Module):
  """Latents (B, h, w, z_dim) -> images (B, 8h, 8w, 3), not clipped."""

  base_dim: int
  dim_mult: Sequence[int]
  num_res_blocks: int
  dtype: jnp.dtype = f32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    mults = tuple(reversed(self.dim_mult))
    x = conv(self.base_dim * mults[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
    x = MidBlock(self.dtype, name="mid")(x)
    for i, mult in enumerate(mults):
      for j in range(self.num_res_blocks + 1):
        x = ResidualBlock(self.base_dim * mult, self.dtype, name=f"stage_{i}_res_{j}")(x)
      if i < len(mults) - 1:
        # Nearest x2 upsampling, then a conv that halves the width.
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = conv(x.shape[-1] // 2, 3, self.dtype, f"stage_{i}_up")(x)
    return _head(x, 3, self.dtype)


def spatial_stride(dim_mult: Sequence[int]) -> int:
  """Image pixels per latent along each side: every stage but the last halves the resolution."""
  return 2 ** (len(dim_mult) - 1)


def _check_shape(x: jax.Array, what: str, channels: int, multiple: int = 1) -> None:
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"{what} must be (B, H, W, {channels}), got shape {x.shape}")
  if x.shape[1] % multiple or x.shape[2] % multiple:
    raise ValueError(f"{what}: height and width must be multiples of {multiple}, got {x.shape}")


class WanVAE(nn.Module):
  """The WAN-2.1 VAE, image path. Keyword names match `configs.models.wan_vae` (plus the stats).

  `encode` returns the normalized posterior mean, `decode` takes normalized latents;
  `__call__` is the round trip (used to initialize every parameter).
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  dtype: str = "float32"
  latents_mean: Sequence[float] = LATENTS_MEAN
  latents_std: Sequence[float] = LATENTS_STD

  def setup(self):
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(
        f"latents_mean and latents_std need {self.z_dim} entries (z_dim), "
        f"got {len(self.latents_mean)} and {len(self.latents_std)}"
      )
    dtype = jnp.dtype(self.dtype)
    arch = dict(dim_mult=tuple(self.dim_mult), num_res_blocks=self.num_res_blocks, dtype=dtype)
    self.encoder = Encoder(self.base_dim, self.z_dim, **arch)
    self.quant_conv = conv(2 * self.z_dim, 1, dtype, None)
    self.post_quant_conv = conv(self.z_dim, 1, dtype, None)
    self.decoder = Decoder(self.base_dim, **arch)

  def _stats(self) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(self.latents_mean, f32), jnp.asarray(self.latents_std, f32)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> normalized latents (B, H/s, W/s, z_dim), fp32."""
    _check_shape(images, "images", 3, spatial_stride(self.dim_mult))
    mu = self.quant_conv(self.encoder(images))[..., : self.z_dim].astype(f32)
    mean, std = self._stats()
    return (mu - mean) / std

  def decode(self, latents: jax.Array, clip: bool = True) -> jax.Array:
    """Normalized latents (B, h, w, z_dim) -> images (B, s h, s w, 3), fp32, clipped to
    [-1, 1] unless `clip` is False (mask logits need the values beyond, and their gradient)."""
    _check_shape(latents, "latents", self.z_dim)
    mean, std = self._stats()
    z = (latents.astype(f32) * std + mean).astype(jnp.dtype(self.dtype))
    image = self.decoder(self.post_quant_conv(z)).astype(f32)
    return jnp.clip(image, -1.0, 1.0) if clip else image

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))
