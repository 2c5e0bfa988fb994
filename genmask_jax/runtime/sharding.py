"""The device mesh and the map from logical axis names to mesh axes.

Models only know logical names (`embed`, `heads`, `activation_batch`, ...). A config gives the
mesh shape over the axes (data, fsdp, tensor) and the rules; everything else is derived here.
The shape is that of one slice: on several TPU slices (devices with distinct `slice_index`) the
data axis also runs across them, over the data-center network, while fsdp and tensor stay
within a slice, so that only the gradient reduction crosses slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# FSDP over `fsdp`, optional tensor parallelism over `tensor`, batch over data x fsdp.
DEFAULT_RULES = (
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("layers", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("patch", None),
  ("freq", None),
  ("text_embed", None),
  ("conv_in", None),
  ("conv_out", None),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 in `sizes` to the devices left over; checks the product."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh sizes {sizes} do not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh sizes {sizes} need {math.prod(sizes)} devices, found {num_devices}")
  return tuple(sizes)


def num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", None) or 0 for d in devices})


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over (data, fsdp, tensor) from one slice's `config.{data,fsdp,tensor}` (-1 = the
  rest); with several slices, data spans them (data x slices)."""
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices(devices)
  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split into {slices} equal slices")
  per_slice = mesh_shape([config[a] for a in MESH_AXES], len(devices) // slices)
  # A mesh axis may run across several axes of the chips' torus (fsdp over all 64 chips of a
  # v6e 8 x 8 slice): jax.make_mesh allows that on v5e only.
  if slices == 1:
    grid = mesh_utils.create_device_mesh(per_slice, devices, allow_split_physical_axes=True)
  else:
    dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(
      per_slice, dcn, devices, allow_split_physical_axes=True
    )
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules(config: ml_collections.ConfigDict | None = None) -> tuple[tuple[str, Any], ...]:
  """The logical-to-mesh rules: `config.rules` (a list of pairs) or the defaults."""
  if config is None or not config.get("rules"):
    return DEFAULT_RULES
  return tuple(
    (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.rules
  )


def batch_shards() -> int:
  """Into how many shards the mesh and rules in context split the batch (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def strip_axis_names(tree: Any) -> Any:
  """The values of a tree boxed with axis names (no sharding constraint is applied)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, logical_rules) -> Any:
  """NamedShardings for a tree of (abstract) values boxed with logical axis names."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def abstract_with_shardings(abstract_boxed: Any, mesh: Mesh, logical_rules) -> tuple[Any, Any]:
  """(ShapeDtypeStructs carrying their shardings, the shardings) of a boxed abstract tree."""
  shardings = logical_shardings(abstract_boxed, mesh, logical_rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    strip_axis_names(abstract_boxed),
    shardings,
  )
  return abstract, shardings


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the batch (leading axis)."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    for k, v in local.items()
  }
