"""Reading PyTorch checkpoint files and accounting for every tensor in them.

Nothing here unpickles arbitrary objects: safetensors files are read as tensors only and
`.pth` files go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file does not match what the model expects."""


def _to_numpy(tensor) -> np.ndarray:
  import torch

  if tensor.dtype in (torch.bfloat16, torch.float16):
    tensor = tensor.float()  # Master parameters are fp32.
  return tensor.detach().cpu().numpy()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  with safe_open(path, framework="pt") as f:
    return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index_path}: no 'weight_map' object in the index file")
  folder = os.path.dirname(index_path)
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(folder, shard)
    if not os.path.exists(shard_path):
      raise CheckpointError(f"{index_path}: shard file {shard_path} does not exist")
    shard_tensors = _read_safetensors(shard_path)
    listed = {k for k, v in weight_map.items() if v == shard}
    if listed != set(shard_tensors):
      raise CheckpointError(
        f"{shard_path}: keys differ from the index {index_path}: "
        f"listed but absent {sorted(listed - set(shard_tensors))[:10]}, "
        f"present but unlisted {sorted(set(shard_tensors) - listed)[:10]}"
      )
    tensors.update(shard_tensors)
  return tensors


def _read_torch(path: str) -> dict[str, np.ndarray]:
  import torch

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError and others; name the file.
    raise CheckpointError(f"{path}: not a weights-only PyTorch file ({e})") from e
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise CheckpointError(f"{path}: expected a flat state dict of tensors")
  return {k: _to_numpy(v) for k, v in obj.items()}


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as fp32/int numpy arrays keyed by their PyTorch names.

  `path` is a `.safetensors` file, a sharded `*.safetensors.index.json`, a `.pth`/`.pt`
  state dict, or a folder holding exactly one safetensors checkpoint (single or sharded).
  """
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    singles = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
      return _read_sharded(os.path.join(path, indexes[0]))
    if not indexes and len(singles) == 1:
      return _read_safetensors(os.path.join(path, singles[0]))
    raise CheckpointError(
      f"{path}: expected one *.safetensors or one *.safetensors.index.json, found {names}"
    )
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors.index.json"):
    return _read_sharded(path)
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return _read_torch(path)
  raise CheckpointError(f"{path}: unknown checkpoint format (expected safetensors or .pth)")


class TensorLedger:
  """The tensors of one checkpoint, with a record of which were taken.

  Every tensor must be taken exactly once with the expected shape, or set aside with a
  reason; `close()` raises one error: a summary line (the architecture the checkpoint's shapes
  show next to the config's), then every missing, unexpected and mis-shaped key.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self._tensors = dict(tensors)
    self.source = source
    self._used: set[str] = set()
    self._missing: list[str] = []
    self._misshaped: list[str] = []
    self.set_aside: dict[str, str] = {}

  def keys(self) -> Iterable[str]:
    return self._tensors.keys()

  def __contains__(self, key: str) -> bool:
    return key in self._tensors

  def shape(self, key: str) -> tuple[int, ...] | None:
    return tuple(self._tensors[key].shape) if key in self._tensors else None

  def _mark(self, key: str) -> None:
    if key in self._used:
      raise CheckpointError(f"{self.source}: tensor {key!r} used twice")
    self._used.add(key)

  def take(self, key: str, shape: Sequence[int]) -> np.ndarray:
    """The tensor `key`, which must have `shape`; zeros (and a recorded error) otherwise."""
    shape = tuple(shape)
    if key not in self._tensors:
      self._missing.append(f"{key} {shape}")
      return np.zeros(shape, np.float32)
    self._mark(key)
    value = self._tensors[key]
    if tuple(value.shape) != shape:
      self._misshaped.append(f"{key}: expected {shape}, found {tuple(value.shape)}")
      return np.zeros(shape, np.float32)
    return value

  def set_aside_key(self, key: str, reason: str) -> None:
    """Accounts for a tensor that is deliberately not used (and says why)."""
    if key not in self._tensors:
      self._missing.append(f"{key} (expected, to be set aside: {reason})")
      return
    self._mark(key)
    self.set_aside[key] = reason

  def close(self, summary: str) -> None:
    unexpected = sorted(set(self._tensors) - self._used)
    problems = []
    if self._missing:
      problems.append(f"missing keys ({len(self._missing)}): {self._missing}")
    if unexpected:
      problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if self._misshaped:
      problems.append(f"mis-shaped keys ({len(self._misshaped)}): {self._misshaped}")
    if problems:
      raise CheckpointError(f"{self.source}: {summary}\n" + "; ".join(problems))


def rename_keys(tensors: Mapping[str, np.ndarray], rename) -> dict[str, np.ndarray]:
  """Applies `rename(key) -> key` to every key, refusing collisions."""
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    new = rename(key)
    if new in out:
      raise CheckpointError(f"two tensors map to {new!r} (one of them {key!r})")
    out[new] = value
  return out
