"""Data-parallel metric sums over a global evaluation batch, padding never counted.

A global batch is sharded along its leading axis over (data, fsdp) on every device of every
host; the last batch of a split is padded and carries `valid`. Two paths:

- Device (`make_batch_sums`): ground truth padded to one fixed (H, W) with the original mask in
  the top-left corner. One jitted function undoes the resize, scores each sample and sums over
  the global batch; the sums come back replicated, so every process holds the same numbers.
- Host (`stats_at_original` + `gather_sums`): ground truth at each sample's own original size
  (ragged). Each process scores its own rows in numpy, then per-sample (I, U, valid) are
  gathered from all processes before summing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from genmask_jax.data.masks import IGNORE
from genmask_jax.data.masks import VALUES as MASK_VALUES
from genmask_jax.data.resize import undo_resize
from genmask_jax.evaluation import metrics
from genmask_jax.runtime import sharding

INT32_LIMIT = 2**31


def undo_resize_padded(
  logits: jax.Array, original_hw: jax.Array, resized_hw: jax.Array, out_hw: Sequence[int]
) -> jax.Array:
  """Logits (B, S, S), sizes (B, 2) int -> logits (B, H, W) float32 with sample b's
  original-size logits in the top-left (h_b, w_b) block; what lies outside is unspecified."""
  square = logits.shape[-1]
  if logits.ndim != 3 or logits.shape[1] != square:
    raise ValueError(f"logits must be (B, S, S), got shape {logits.shape}")

  def one(x, hw, rhw):
    # Repeat the last valid row/column over the padding, so interpolating at the valid
    # block's edge clamps like cropping does instead of blending in padded logits.
    rows = jnp.minimum(jnp.arange(square), rhw[0] - 1)
    cols = jnp.minimum(jnp.arange(square), rhw[1] - 1)
    x = x[rows][:, cols].astype(jnp.float32)
    scale = hw.astype(jnp.float32) / rhw.astype(jnp.float32)
    return jax.image.scale_and_translate(
      x, tuple(out_hw), (0, 1), scale, jnp.zeros(2), "linear", antialias=False
    )

  return jax.vmap(one)(logits, original_hw, resized_hw)


def batch_sums(
  logits: jax.Array,
  gt: jax.Array,
  original_hw: jax.Array,
  resized_hw: jax.Array,
  valid: jax.Array,
) -> dict[str, jax.Array]:
  """`metrics.sums` of a batch: logits (B, S, S) at the model's resolution, gt (B, H, W) uint8
  original masks padded to (H, W), sizes (B, 2) int, valid (B,) bool."""
  batch, height, width = gt.shape
  # Counts are int32 on device; the host widens the per-batch sums.
  if 10 * height * width >= INT32_LIMIT or batch * height * width >= INT32_LIMIT:
    raise ValueError(f"ground truth batch {gt.shape} is too large for int32 pixel counts")
  logits = undo_resize_padded(logits, original_hw, resized_hw, (height, width))
  # Pixels outside each original image are ignored, whatever the padding value.
  inside = (jnp.arange(height)[None, :, None] < original_hw[:, 0, None, None]) & (
    jnp.arange(width)[None, None, :] < original_hw[:, 1, None, None]
  )
  gt = jnp.where(inside, gt, IGNORE)
  intersection, union = metrics.intersection_union(logits > 0, gt, jnp)
  return metrics.sums(intersection, union, valid, jnp)


def make_batch_sums(mesh: jax.sharding.Mesh) -> Callable[..., dict[str, jax.Array]]:
  """`batch_sums` jitted for batches sharded over (data, fsdp); the sums are replicated."""
  batch = lambda ndim: sharding.batch_sharding(mesh, ndim)
  return jax.jit(
    batch_sums,
    in_shardings=(batch(3), batch(3), batch(2), batch(2), batch(1)),
    out_shardings=sharding.replicated(mesh),
  )


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array (the rows it fed in), in numpy."""
  spec = x.sharding.spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, spec))


def stats_at_original(
  logits: np.ndarray,
  masks: Sequence[np.ndarray],
  original_hw: np.ndarray,
  resized_hw: np.ndarray,
  valid: np.ndarray,
  ids: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample (I, U) int64 of this process's samples: logits (b, S, S), masks[k] (h_k, w_k)
  in {0, 1, 255} at the original size; padded samples (valid False) are skipped (0, 0)."""
  count = len(logits)
  if not len(masks) == len(original_hw) == len(resized_hw) == len(valid) == count:
    raise ValueError(
      f"batch fields disagree in length: logits {count}, masks {len(masks)}, "
      f"original_hw {len(original_hw)}, resized_hw {len(resized_hw)}, valid {len(valid)}"
    )
  intersection, union = np.zeros(count, np.int64), np.zeros(count, np.int64)
  for k in np.flatnonzero(valid):
    name = f"sample {ids[k]!r}" if ids is not None else f"sample {k} of the batch"
    gt = np.asarray(masks[k])
    if gt.shape != tuple(original_hw[k]):
      raise ValueError(f"{name}: mask shape {gt.shape}, recorded original size {original_hw[k]}")
    bad = ~np.isin(gt, MASK_VALUES)
    if bad.any():
      raise ValueError(
        f"{name}: mask values must be one of {MASK_VALUES}, found {np.unique(gt[bad])}"
      )
    pred = undo_resize(logits[k], original_hw[k], resized_hw[k]) > 0
    intersection[k], union[k] = metrics.intersection_union(pred, gt)
  return intersection, union


def gather_sums(intersection: np.ndarray, union: np.ndarray, valid: np.ndarray) -> metrics.IoUSums:
  """Sums over the samples of every process; each process passes its own equally long arrays
  and gets the same result."""
  if max(np.max(union, initial=0), np.max(intersection, initial=0)) >= INT32_LIMIT:
    raise ValueError("per-sample pixel counts exceed int32, which the cross-process gather uses")
  gathered = multihost_utils.process_allgather(
    (np.asarray(intersection, np.int32), np.asarray(union, np.int32), np.asarray(valid, bool)),
    tiled=True,
  )
  intersection, union, valid = (np.asarray(a) for a in gathered)
  return metrics.IoUSums.of_samples(intersection[valid], union[valid])
