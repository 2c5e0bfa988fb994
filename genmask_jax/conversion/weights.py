"""Converted model weights on disk: one Orbax checkpoint per model plus a JSON record.

Layout of a converted folder:
  dit/              Orbax checkpoint of the WanDiT parameters
  vae/              Orbax checkpoint of the WanVAE parameters (when converted)
  conversion.json   sources, configs and the tensors set aside with their reasons
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from genmask_jax.runtime import fileio

RECORD = "conversion.json"


def save(folder: str, name: str, params: Any) -> None:
  """Writes `params` (numpy or jax arrays) as the Orbax checkpoint `folder/name`."""
  path = fileio.absolute(os.path.join(folder, name))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params)


def restore(folder: str, name: str, target: Any) -> Any:
  """Restores `folder/name` directly into `target`'s shardings and dtypes.

  `target` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (for example
  from `jax.eval_shape` and the sharding rules), so no device ever holds unsharded weights.
  """
  path = fileio.absolute(os.path.join(folder, name))
  if not fileio.isdir(path):
    raise FileNotFoundError(f"{path}: no converted '{name}' checkpoint (run launch/convert_wan.py)")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def write_record(folder: str, record: dict) -> None:
  fileio.write_json(os.path.join(folder, RECORD), record, indent=2)


def read_record(folder: str) -> dict:
  return fileio.read_json(os.path.join(folder, RECORD), FileNotFoundError)
