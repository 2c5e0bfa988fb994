"""A Qwen2.5-VL checkpoint that encodes a trained run's queries in-process, as its stores did.

The run's feature stores (launch/precompute_vlm.py) fix what a query's text features must be:
the encoder, the prompt template, the image policy and the stored precision. `VLM.features`
encodes the queries that way (vlm/encode.py: the one encoding both use), so a store sample gets
the features its evaluation read. PyTorch is imported only when a query is encoded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from genmask_jax.data.features import STORE_DTYPES, FeatureMeta, check_encoder
from genmask_jax.data.records import Sample
from genmask_jax.vlm import image_policy


@dataclasses.dataclass(frozen=True)
class VLM:
  """A Qwen2.5-VL checkpoint directory, and how to run it."""

  path: str
  model_id: str | None = None  # The encoder's name; default: the directory's name.
  device: str = "cpu"
  dtype: str = "float32"
  batch_size: int = 8
  max_new_tokens: int = 32  # Reasoning mode's rewrite length cap (launch/precompute_vlm.py's).

  def features(
    self, samples: Sequence[Sample], expected: FeatureMeta, reasoning: bool = False
  ) -> list[np.ndarray]:
    """(L, D) hidden states of the samples, as a store of meta `expected` holds them: encoded
    with its template and image policy, the target first rewritten in reasoning mode, and
    rounded to its dtype (float32: not rounded). Refuses another encoder or width first."""
    import torch

    from genmask_jax.vlm import encode

    model, processor = encode.load_vlm(self.path, self.device, self.dtype)
    model_id = self.model_id or os.path.basename(os.path.normpath(self.path))
    found = dataclasses.replace(
      expected, model_id=model_id, hidden_size=model.config.text_config.hidden_size
    )
    check_encoder(found, expected, f"vlm {self.path} (encoder id {model_id!r})")
    policy = image_policy.from_record(expected.image_policy)
    hidden = [
      item.hidden
      for start in range(0, len(samples), self.batch_size)
      for item in encode.encode_samples(
        model,
        processor,
        samples[start : start + self.batch_size],
        reasoning=reasoning,
        max_new_tokens=self.max_new_tokens,
        policy=policy,
      )
    ]
    del model  # Its accelerator memory goes to the JAX model next.
    torch.cuda.empty_cache()
    if expected.dtype in STORE_DTYPES:  # The precision the model was trained and evaluated at.
      return [h.astype(STORE_DTYPES[expected.dtype]).astype(np.float32) for h in hidden]
    return hidden
