"""The GenMask model bundle: the WAN DiT, the frozen WAN VAE and the optional linear mask head.

Modules only; parameters live in plain pytrees held by the caller:
  trainable = {"dit": ..., "mask_head": ...}  (the head only for the linear-BCE format)
  vae       = the frozen VAE's parameters
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from genmask_jax.data.masks import image_to_mask_logits
from genmask_jax.diffusion.mask_decoders import LinearMaskHead
from genmask_jax.models.dit import WanDiT
from genmask_jax.models.vae import WanVAE, spatial_stride
from genmask_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class Models:
  dit: WanDiT
  vae: WanVAE
  mask_head: LinearMaskHead | None
  use_condition_tokens: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Models:
    diffusion = config.diffusion
    return cls(
      dit=WanDiT(**config.dit.to_dict()),
      vae=WanVAE(**config.vae.to_dict()),
      mask_head=LinearMaskHead(spatial_stride(config.vae.dim_mult))
      if diffusion.segmentation_loss == "linear_bce"
      else None,
      use_condition_tokens=diffusion.use_condition_tokens,
    )

  def velocity(self, params, x, t, context, context_mask, cond):
    """The DiT's velocity; `cond` is ignored when the config turns condition tokens off."""
    cond = cond if self.use_condition_tokens else None
    return self.dit.apply({"params": params}, x, t, context, context_mask, cond)

  def encode(self, vae_params, images: jax.Array) -> jax.Array:
    """Frozen VAE encoding of (B, H, W, 3) images to (B, 1, H/s, W/s, z_dim) latents, s the
    VAE's spatial stride."""
    latents = self.vae.apply({"params": vae_params}, images, method=WanVAE.encode)
    return jax.lax.stop_gradient(latents[:, None])

  def decode(self, vae_params, latents: jax.Array, clip: bool = True) -> jax.Array:
    """(B, h, w, z_dim) latents to (B, s h, s w, 3) images in [-1, 1] (unbounded if not `clip`)."""
    return self.vae.apply({"params": vae_params}, latents, clip, method=WanVAE.decode)

  def vae_mask_logits(self, vae_params, latents: jax.Array) -> jax.Array:
    return image_to_mask_logits(self.decode(vae_params, latents, clip=False))

  def init_params(self, rng: jax.Array) -> dict:
    """Random trainable parameters, boxed with logical axis names.

    The forward pass that creates them runs on as many samples as the mesh in context splits
    the batch into: a kernel mapped over the batch shards (splash) needs at least one each.
    """
    rng_dit, rng_head = jax.random.split(rng)
    _, ph, pw = self.dit.patch_size
    batch = sharding.batch_shards()
    latent = jnp.zeros((batch, 1, 2 * ph, 2 * pw, self.vae.z_dim))
    context = jnp.zeros((batch, 1, self.dit.text_dim))
    params = {"dit": self.dit.init(rng_dit, latent, jnp.zeros((batch,)), context)["params"]}
    if self.mask_head is not None:
      params["mask_head"] = self.mask_head.init(rng_head, latent[:, 0])["params"]
    return params

  def init_vae_params(self, rng: jax.Array) -> dict:
    return self.vae.init(rng, jnp.zeros((1, 8, 8, 3)))["params"]

  # Shapes only: the key is made inside the trace, so that no concrete array is created (a
  # compile-only TPU mesh in context could not hold one).
  def abstract_params(self) -> dict:
    """`init_params`' boxed shapes and dtypes, computed without creating any array."""
    return jax.eval_shape(lambda: self.init_params(jax.random.key(0)))

  def abstract_vae_params(self) -> dict:
    return jax.eval_shape(lambda: self.init_vae_params(jax.random.key(0)))
