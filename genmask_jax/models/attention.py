"""Multi-head attention behind one function; the kernel is chosen by name (config).

"auto" picks the kernel of the device the computation is compiled for (the mesh in context, or
the default backend without one), never of the host that compiles it: splash on TPU, cuDNN on
GPU (bf16 / fp16 compute), the XLA reference otherwise. A Pallas TPU kernel runs interpreted
only when the target is not a TPU (tests on CPU).

All implementations take q (B, Lq, H, D), k and v (B, Lk, H, D), an optional key mask
(B, Lk) (True = attend) and splash's tile sizes, and return (B, Lq, H, D) in v's dtype. A query
whose keys are all masked averages all Lk values uniformly, as a softmax over equal logits does.
The output is tagged `CHECKPOINT_NAME` for name-based rematerialization policies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from genmask_jax.models.splash_tiles import SPLASH_BLOCK_SIZES

CHECKPOINT_NAME = "attention_out"

_LANES = 128
# Logical axes of q / k / v and of the key mask (see genmask_jax.runtime.sharding).
_QKV_AXES = ("activation_batch", "activation_length", "activation_heads", None)
_KV_AXES = ("activation_batch", None, "activation_heads", None)
_MASK_AXES = ("activation_batch", None)


def _xla(q, k, v, key_mask, block_sizes) -> jax.Array:
  """Reference kernel: fp32 logits and softmax, probabilities cast back to v's dtype."""
  del block_sizes  # XLA tiles on its own.
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _jax_nn(q, k, v, key_mask, block_sizes, *, implementation: str | None) -> jax.Array:
  """`jax.nn.dot_product_attention`; implementation="cudnn" is the fused flash kernel on GPU."""
  del block_sizes  # The kernel tiles on its own.
  mask = None
  if key_mask is not None:  # cuDNN takes a mask only as a full (B, 1, Lq, Lk) bias.
    mask = jnp.broadcast_to(key_mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def splash_tiles(block_sizes: Mapping[str, int | bool | None], lq: int, lk: int) -> dict:
  """`block_sizes` with each q tile at most `lq` and each kv tile at most `lk`, lane-rounded."""
  limits = {"block_q": _round_up(lq, _LANES), "block_kv": _round_up(lk, _LANES)}

  def fit(name, size):
    if not name.startswith("block_") or size is None:
      return size
    return min(size, limits["block_q" if name.startswith("block_q") else "block_kv"])

  return {name: fit(name, size) for name, size in block_sizes.items()}


def _padded_length(length: int, tiles: dict, prefix: str) -> int:
  """`length` rounded up to a whole number of every tile whose name starts with `prefix`."""
  sizes = [s for name, s in tiles.items() if name.startswith(prefix) and s is not None]
  return _round_up(length, math.lcm(*sizes))


def _heads_first(x: jax.Array, length: int) -> jax.Array:
  """(B, L, H, D) -> (B, H, length, D), zero-padded along L."""
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).swapaxes(1, 2)


def target_platform() -> str:
  """The platform of the devices being compiled for: "tpu", "gpu" or "cpu"."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jax.default_backend()
  return mesh.abstract_device.platform


def _splash_shard(q, k, v, key_mask, block_sizes, interpret: bool) -> jax.Array:
  """Splash attention on one shard: sequences padded to whole tiles, padded keys masked
  through segment ids, padded queries dropped."""
  (lq, heads, head_dim), lk = q.shape[1:], k.shape[1]
  tiles = splash_tiles(block_sizes, lq, lk)
  lq_pad, lk_pad = _padded_length(lq, tiles, "block_q"), _padded_length(lk, tiles, "block_kv")
  kernel = splash.make_splash_mha(
    splash.MultiHeadMask([splash.FullMask((lq_pad, lk_pad))] * heads),
    block_sizes=splash.BlockSizes(**tiles),
    head_shards=1,
    q_seq_shards=1,
    residual_checkpoint_name=CHECKPOINT_NAME,
    interpret=interpret,
  )
  query_ids = jnp.ones((lq_pad,), jnp.int32)
  key_ids = jnp.pad(key_mask, ((0, 0), (0, lk_pad - lk))).astype(jnp.int32)
  one = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(query_ids, ids))
  # The kernel takes (H, L, D) per example and leaves the logits unscaled.
  q_scaled = q * head_dim**-0.5
  out = jax.vmap(one)(
    _heads_first(q_scaled, lq_pad), _heads_first(k, lk_pad), _heads_first(v, lk_pad), key_ids
  )
  out = out.swapaxes(1, 2)[:, :lq].astype(v.dtype)
  # Splash would average the padded keys too; the reference averages the Lk real ones.
  uniform = jnp.mean(v, axis=1, keepdims=True, dtype=jnp.float32).astype(v.dtype)
  return jnp.where(jnp.any(key_mask, axis=1)[:, None, None, None], out, uniform)


def _splash(q, k, v, key_mask, block_sizes) -> jax.Array:
  """Pallas splash attention (TPU), run per batch / head shard of the mesh in context."""
  if key_mask is None:
    key_mask = jnp.ones(k.shape[:2], bool)
  run = functools.partial(
    _splash_shard,
    block_sizes=block_sizes or SPLASH_BLOCK_SIZES,
    interpret=target_platform() != "tpu",
  )
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q, k, v, key_mask)
  # A Pallas call cannot be partitioned by XLA: map it over the shards explicitly.
  q_spec, kv_spec, mask_spec = map(nn.logical_to_mesh_axes, (_QKV_AXES, _KV_AXES, _MASK_AXES))
  return jax.shard_map(
    run,
    in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q, k, v, key_mask)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
  "xla": _xla,
  "cudnn": functools.partial(_jax_nn, implementation="cudnn"),
  "jax_xla": functools.partial(_jax_nn, implementation="xla"),
  "splash": _splash,
}
# Fused kernels: no score matrix, and no dot that a remat policy could keep.
FLASH_KERNELS = ("splash", "cudnn")
AUTO = "auto"
FLASH_DTYPES = (jnp.bfloat16, jnp.float16)  # What cuDNN's flash attention computes in.


def resolve(impl: str, dtype: jnp.dtype) -> str:
  """The kernel `impl` names; for "auto", the target platform's kernel for `dtype` inputs."""
  if impl != AUTO:
    if impl not in IMPLEMENTATIONS:
      raise ValueError(
        f"unknown attention implementation {impl!r}; available: {AUTO} or {sorted(IMPLEMENTATIONS)}"
      )
    return impl
  platform = target_platform()
  if platform == "tpu":
    return "splash"
  if platform == "gpu" and dtype in FLASH_DTYPES:
    return "cudnn"
  return "xla"


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  key_mask: jax.Array | None = None,
  *,
  impl: str = "xla",
  block_sizes: Mapping[str, int | bool] | None = None,
) -> jax.Array:
  """Softmax attention with scale 1/sqrt(head_dim), using the kernel named `impl` ("auto": the
  target's, see `resolve`).

  block_sizes: splash's tiles (fields of `splash.BlockSizes`; None: `SPLASH_BLOCK_SIZES`);
  the other kernels choose their own.
  """
  kernel = IMPLEMENTATIONS[resolve(impl, q.dtype)]
  return checkpoint_name(kernel(q, k, v, key_mask, block_sizes), CHECKPOINT_NAME)
