"""A sample as the model sees it: image and mask resized and padded, text states padded.

One module for the training and evaluation pipelines, the latent encoder, predict / generate
and the demo, so that they all feed the model the same arrays. Numpy and cv2 only (no JAX, no
grain). One example is

  image        float32 (R, R, 3) in [-1, 1]: resized so that the longer side is R, then padded
               at the bottom / right with -1 (black)
  mask         uint8 (R, R) in {0, 1, 255} (segmentation only), nearest-neighbour resized,
               padding 0
  text         (S, D) VLM hidden states, zero-padded to S = text_len (never truncated)
  text_mask    bool (S,), True on real tokens
  size         int32 (2,): the original (height, width)
  resized_size int32 (2,): (height, width) of the image inside the padded square; a
               prediction is undone by cropping [:h, :w] and resizing to `size`
  image_latents, mask_latents
               float32 (R/s, R/s, z_dim), only with a latent store (latents.py): the VAE
               latents of the image and of `mask`, read instead of encoded every step; such
               examples hold no `image` (it is neither decoded nor resized)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from genmask_jax.data import records
from genmask_jax.data.resize import resize_and_pad, resized_shape
from genmask_jax.data.store import StoreError

TEXT_DTYPES = {
  "float32": np.dtype(np.float32),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float16": np.dtype(np.float16),
}


def to_uint8(images: Any) -> np.ndarray:
  """Images in [-1, 1] (as the model reads and the VAE decodes them) -> uint8, rounded."""
  return ((np.asarray(images) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)


def pixels(sample: Mapping, resolution: int, with_image: bool = True) -> dict[str, np.ndarray]:
  """A sample's image (unless `with_image` is False) and mask as the model sees them, with their
  sizes (module docstring)."""
  h, w = sample["height"], sample["width"]  # decode_image checks that the image has them.
  out = {
    "size": np.array([h, w], np.int32),
    "resized_size": np.array(resized_shape(h, w, resolution), np.int32),
  }
  if with_image:
    image = resize_and_pad(records.decode_image(sample), resolution, False)
    out["image"] = image.astype(np.float32) / 127.5 - 1
  if sample["task"] == "segmentation":
    out["mask"] = resize_and_pad(records.decode_mask(sample), resolution, True)
  return out


def pad_text(
  hidden: np.ndarray, text_len: int, dtype: str, sample_id: str
) -> tuple[np.ndarray, np.ndarray]:
  """(text, text_mask): (L, D) hidden states zero-padded to (text_len, D) in `dtype` (a key of
  TEXT_DTYPES), and True on the L real tokens; StoreError naming the sample if L > text_len."""
  if hidden.shape[0] > text_len:
    raise StoreError(
      f"sample {sample_id!r}: {hidden.shape[0]} text tokens exceed text_len={text_len}; "
      "raise text_len (the DiT's text length) rather than truncate"
    )
  text = np.zeros((text_len, hidden.shape[1]), TEXT_DTYPES[dtype])
  text[: hidden.shape[0]] = hidden
  return text, np.arange(text_len) < hidden.shape[0]


def example(element: Mapping, *, resolution: int, text_len: int, text_dtype: str) -> dict:
  """One joined sample {"sample", "hidden", optional "latents"} -> one example (module
  docstring)."""
  sample, hidden = element["sample"], element["hidden"]
  if "latents" in element:  # The image's latents replace it.
    out = pixels(sample, resolution, with_image=False) | element["latents"]
  else:
    out = pixels(sample, resolution)
  out["text"], out["text_mask"] = pad_text(hidden, text_len, text_dtype, sample["id"])
  return out
