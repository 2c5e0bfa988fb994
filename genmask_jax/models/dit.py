"""The WAN-2.1 diffusion transformer, with GenMask's per-token timesteps and condition tokens.

Math follows WAN-2.1 (`wan/modules/model.py`) exactly (tests/test_dit.py checks it against
diffusers' WanTransformer3DModel).
Additions: timesteps per token (the WAN-2.2 way), clean condition tokens appended after the
noisy ones (timestep 0, their own RoPE frame, outputs dropped), and an optional key mask
for the text. Latents are channels-last: (B, F, H, W, C).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from genmask_jax.models import attention, rope
from genmask_jax.models.timestep_embedding import sinusoidal_embedding

f32 = jnp.float32
gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)

# Block activations tagged with `checkpoint_name`, kept by the name-based policies below.
QKV, FFN_HIDDEN = "attention_qkv", "ffn_hidden"
_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # Keep q / k / v and the attention output; recompute the rest of the block.
  "save_attention": _save(QKV, attention.CHECKPOINT_NAME),
  # Also keep the FFN hidden layer, the largest activation (L x ffn_dim).
  "save_attention_ffn": _save(QKV, attention.CHECKPOINT_NAME, FFN_HIDDEN),
  # Every weight matmul's output and the attention output (maxtext's choice on H100): the backward
  # recomputes only norms, modulation and activations. The attention kernel is no dot (cuDNN's is
  # a custom call), so "dots" alone would run it again; its output is kept by name.
  "dots_attention": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save(attention.CHECKPOINT_NAME)
  ),
}


def dense(features: int, axes: tuple[str | None, str | None], dtype, name: str) -> nn.Dense:
  """A Linear layer with fp32 parameters and logical axis names (kernel `axes`, bias `axes[1]`)."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=f32,
    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
    name=name,
  )


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, in fp32."""
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=f32)(x.astype(f32))


def per_token(values: jax.Array, slot: jax.Array | None) -> jax.Array:
  """Per-slot values (B, K, ...) to per-token values; `slot` (L,) picks each token's slot.

  slot=None means the slots already line up with the tokens (K == L) or broadcast (K == 1).
  """
  return values if slot is None else jnp.take(values, slot, axis=1)


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
  """(B, F, H, W, C) -> (B, L, pt*ph*pw*C); tokens in (f, h, w) order, features (pt, ph, pw, c)."""
  b, f, h, w, c = x.shape
  pt, ph, pw = patch
  if f % pt or h % ph or w % pw:
    raise ValueError(
      f"latent shape {x.shape[1:4]} is not divisible by the patch size {tuple(patch)}"
    )
  x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens: jax.Array, grid: Sequence[int], patch: Sequence[int]) -> jax.Array:
  """Inverse of `patchify`: (B, F'*H'*W', pt*ph*pw*C) -> (B, F, H, W, C)."""
  b = tokens.shape[0]
  (f, h, w), (pt, ph, pw) = grid, patch
  x = tokens.reshape(b, f, h, w, pt, ph, pw, -1)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, f * pt, h * ph, w * pw, -1)


class Attention(nn.Module):
  """WAN attention: q/k RMS-normed over all heads together, RoPE on q and k (self-attention)."""

  dim: int
  num_heads: int
  eps: float
  dtype: jnp.dtype
  impl: str
  block_sizes: Mapping[str, int | bool] | None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    kv: jax.Array,
    rope_tables: tuple[jax.Array, jax.Array] | None = None,
    key_mask: jax.Array | None = None,
  ) -> jax.Array:
    rms_norm = functools.partial(
      nn.RMSNorm,
      epsilon=self.eps,
      dtype=f32,
      param_dtype=f32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads",)),
    )
    heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, -1)
    q = rms_norm(name="norm_q")(dense(self.dim, ("embed", "heads"), self.dtype, "q")(x))
    k = rms_norm(name="norm_k")(dense(self.dim, ("embed", "heads"), self.dtype, "k")(kv))
    v = dense(self.dim, ("embed", "heads"), self.dtype, "v")(kv)
    q, k, v = heads(q), heads(k), heads(v)
    if rope_tables is not None:
      q, k = rope.apply(q, *rope_tables), rope.apply(k, *rope_tables)
    names = ("activation_batch", "activation_length", "activation_heads", None)
    q, k, v = (
      checkpoint_name(nn.with_logical_constraint(y.astype(self.dtype), names), QKV)
      for y in (q, k, v)
    )
    out = attention.dot_product_attention(
      q, k, v, key_mask, impl=self.impl, block_sizes=self.block_sizes
    )
    return dense(self.dim, ("heads", "embed"), self.dtype, "o")(out.reshape(*x.shape[:2], self.dim))


class Block(nn.Module):
  """One WAN block: modulated self-attention, plain cross-attention, modulated FFN."""

  dim: int
  ffn_dim: int
  num_heads: int
  eps: float
  dtype: jnp.dtype
  attention: str
  attention_block_sizes: Mapping[str, int | bool] | None

  @nn.compact
  def __call__(self, x, modulation_t, slot, context, context_mask, rope_tables):
    modulation = self.param(
      "modulation",
      nn.with_logical_partitioning(nn.initializers.normal(self.dim**-0.5), (None, "embed")),
      (6, self.dim),
      f32,
    )
    # shift, scale, gate for self-attention, then for the FFN; fp32 per token.
    e = per_token(modulation + modulation_t, slot)
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (e[:, :, i] for i in range(6))
    attn = functools.partial(
      Attention,
      self.dim,
      self.num_heads,
      self.eps,
      self.dtype,
      self.attention,
      self.attention_block_sizes,
    )

    h = (layer_norm(x, self.eps) * (1 + scale_sa) + shift_sa).astype(self.dtype)
    x = x + attn(name="self_attn")(h, h, rope_tables) * gate_sa

    h = nn.LayerNorm(
      epsilon=self.eps,
      dtype=f32,
      param_dtype=f32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      name="norm3",
    )(x)
    x = x + attn(name="cross_attn")(h.astype(self.dtype), context, None, context_mask)

    h = (layer_norm(x, self.eps) * (1 + scale_ff) + shift_ff).astype(self.dtype)
    h = checkpoint_name(dense(self.ffn_dim, ("embed", "mlp"), self.dtype, "ffn_in")(h), FFN_HIDDEN)
    h = gelu_tanh(h)
    x = x + dense(self.dim, ("mlp", "embed"), self.dtype, "ffn_out")(h) * gate_ff
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, None


class TokenLayout(NamedTuple):
  """The DiT's token sequence: the noisy latents' patches, then the condition's (if any).

  Tokens take their timestep embedding from a slot: one slot for all noisy tokens (t of shape
  (B,)) or one per noisy token (t of shape (B, L)), then one slot with t = 0 shared by every
  condition token.
  """

  tokens: jax.Array  # (B, L, patch features): noisy tokens first.
  positions: np.ndarray  # (L, 3) RoPE grid positions; condition frames after the noisy ones.
  t_slots: jax.Array  # (B, K) fp32 timestep of each slot.
  slot: np.ndarray | None  # (L,) each token's slot; None: slots line up with tokens or broadcast.
  n_noisy: int
  grid: list[int]  # The noisy latents' (F, H, W) in patches.


def token_layout(
  x: jax.Array,
  t: jax.Array,
  cond: jax.Array | None,
  patch_size: Sequence[int],
  cond_frame_start: int,
) -> TokenLayout:
  """Patches, RoPE positions and timestep slots of noisy latents `x` and condition `cond`."""
  grid = [n // p for n, p in zip(x.shape[1:4], patch_size, strict=True)]
  tokens = patchify(x, patch_size)
  n_noisy = tokens.shape[1]
  positions = rope.grid_positions(*grid)
  t = jnp.broadcast_to(jnp.asarray(t, f32), x.shape[:1]) if jnp.ndim(t) == 0 else t.astype(f32)
  if t.ndim == 2 and t.shape[1] != n_noisy:
    raise ValueError(f"per-token timesteps have shape {t.shape}, expected (B, {n_noisy})")
  t_slots = t[:, None] if t.ndim == 1 else t
  if cond is None:
    return TokenLayout(tokens, positions, t_slots, None, n_noisy, grid)
  cond_tokens = patchify(cond, patch_size)
  cond_grid = [n // p for n, p in zip(cond.shape[1:4], patch_size, strict=True)]
  start = grid[0] if cond_frame_start < 0 else cond_frame_start
  positions = np.concatenate([positions, rope.grid_positions(*cond_grid, frame_start=start)])
  tokens = jnp.concatenate([tokens, cond_tokens.astype(tokens.dtype)], axis=1)
  noisy_slots = np.zeros(n_noisy, np.int32) if t.ndim == 1 else np.arange(n_noisy)
  slot = np.concatenate([noisy_slots, np.full(cond_tokens.shape[1], t_slots.shape[1], np.int32)])
  t_slots = jnp.concatenate([t_slots, jnp.zeros_like(t_slots[:, :1])], axis=1)
  return TokenLayout(tokens, positions, t_slots, slot, n_noisy, grid)


class WanDiT(nn.Module):
  """The WAN-2.1 DiT. Keyword names match `configs.models.wan_dit`."""

  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_dim: int = 16
  out_dim: int = 16
  dim: int = 1536
  ffn_dim: int = 8960
  freq_dim: int = 256
  num_heads: int = 12
  num_layers: int = 30
  eps: float = 1e-6
  text_dim: int = 3584
  use_text_mask: bool = False
  cond_frame_start: int = -1
  dtype: str = "float32"
  attention: str = "auto"  # models/attention.py: auto follows the target device.
  attention_block_sizes: Mapping[str, int | bool] | None = None  # Splash tiles; None: defaults.
  remat_policy: str = "none"
  scan_unroll: int = 1

  def _blocks(self) -> nn.Module:
    block = Block
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(
          f"unknown remat_policy {self.remat_policy!r}; "
          f"choose none or one of {sorted(REMAT_POLICIES)}"
        )
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
    return nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * 5,
      length=self.num_layers,
      unroll=self.scan_unroll,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(
      self.dim,
      self.ffn_dim,
      self.num_heads,
      self.eps,
      jnp.dtype(self.dtype),
      self.attention,
      self.attention_block_sizes,
      name="blocks",
    )

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    context_mask: jax.Array | None = None,
    cond: jax.Array | None = None,
  ) -> jax.Array:
    """Predicts the velocity for noisy latents.

    Args:
      x: noisy latents (B, F, H, W, in_dim).
      t: timesteps on the 0..1000 scale, (B,) or per noisy token (B, L).
      context: text features (B, S, text_dim), zero-padded.
      context_mask: (B, S), True for real text tokens; used only if `use_text_mask`.
      cond: clean condition latents (B, Fc, Hc, Wc, in_dim), appended as extra tokens.
    Returns:
      The velocity (B, F, H, W, out_dim) in fp32.
    """
    dtype = jnp.dtype(self.dtype)
    head_dim = self.dim // self.num_heads
    layout = token_layout(x, t, cond, self.patch_size, self.cond_frame_start)
    slot, n_noisy = layout.slot, layout.n_noisy

    h = dense(self.dim, ("patch", "embed"), dtype, "patch_embedding")(layout.tokens.astype(dtype))
    h = nn.with_logical_constraint(
      h.astype(f32), ("activation_batch", "activation_length", "activation_embed")
    )

    # Time embedding per slot, in fp32: e feeds the head, e0 the blocks' modulation. Batch-sharded
    # like every activation: left free, they follow the weights onto embed, and with data > 1 the
    # partitioner can move their gradients back to the batch layout only by full replication.
    per_slot = lambda y: nn.with_logical_constraint(
      y, ("activation_batch", "activation_length", "activation_embed")
    )
    e = sinusoidal_embedding(layout.t_slots, self.freq_dim)
    e = per_slot(dense(self.dim, ("freq", "embed"), f32, "time_embedding_1")(e))
    e = per_slot(dense(self.dim, ("mlp", "embed"), f32, "time_embedding_2")(jax.nn.silu(e)))
    e0 = per_slot(dense(6 * self.dim, ("embed", "mlp"), f32, "time_projection")(jax.nn.silu(e)))
    e0 = e0.reshape(*e0.shape[:2], 6, self.dim)

    c = dense(self.dim, ("text_embed", "embed"), dtype, "text_embedding_1")(context.astype(dtype))
    c = dense(self.dim, ("mlp", "embed"), dtype, "text_embedding_2")(gelu_tanh(c))
    key_mask = context_mask if self.use_text_mask else None

    cos, sin = rope.cos_sin(layout.positions, head_dim)
    h, _ = self._blocks()(h, e0, slot, c, key_mask, (jnp.asarray(cos), jnp.asarray(sin)))

    # Head, on the noisy tokens only: modulated LayerNorm and a linear map, in fp32.
    head_mod = self.param(
      "head_modulation",
      nn.with_logical_partitioning(nn.initializers.normal(self.dim**-0.5), (None, "embed")),
      (2, self.dim),
      f32,
    )
    e_head = per_token(head_mod + e[:, :, None, :], None if slot is None else slot[:n_noisy])
    shift, scale = e_head[:, :, 0], e_head[:, :, 1]
    h = layer_norm(h[:, :n_noisy], self.eps) * (1 + scale) + shift
    out = dense(math.prod(self.patch_size) * self.out_dim, ("embed", "patch"), f32, "head")(h)
    return unpatchify(out, layout.grid, self.patch_size)
