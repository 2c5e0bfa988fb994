"""Small PyTorch reference models (diffusers) with random weights, for parity tests."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Gives every parameter a random value of a sensible scale (norm gains around 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2 and "scale_shift_table" not in name:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(noise / fan_in**0.5)
      elif "norm" in name or "gamma" in name:
        p.copy_(1 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)
  return module


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
