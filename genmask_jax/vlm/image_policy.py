"""How images are resized before the VLM: recorded in feature stores and runs, applied alike by
the offline stage (launch/precompute_vlm.py) and by inference's in-process VLM.

The number of image tokens follows the size the VLM sees, and the DiT reads those tokens as
text context of at most `config.data.text_len`: a model is only fed the layouts it was
trained on when every image goes through the policy its feature stores were computed with.
Torch-free, so the training side can read and record it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 512 * 512


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
  # Side of the square every image is resized to first (bicubic); 0 keeps its size. A fixed
  # side gives every image the same token layout (the demo's 64 x 64 scenes).
  resize: int = 0
  # The VLM processor's area cap (Qwen2.5-VL resizes larger images down, keeping the aspect).
  max_pixels: int = DEFAULT_MAX_PIXELS

  def apply(self, image: np.ndarray) -> Image.Image:
    """The (H, W, 3) uint8 image as the VLM is given it (the processor then applies
    `max_pixels`)."""
    pil = Image.fromarray(image)
    side = self.resize
    return pil if not side or pil.size == (side, side) else pil.resize((side, side), Image.BICUBIC)

  def to_record(self) -> dict[str, int]:
    return dataclasses.asdict(self)


DEFAULT = ImagePolicy()


def from_record(record: Mapping[str, Any] | None) -> ImagePolicy:
  """The policy a store or run recorded; None (converted weights without a run, whose
  features are unknown) gives the defaults of launch/precompute_vlm.py."""
  return ImagePolicy(**record) if record is not None else DEFAULT
