"""The device mesh and the map from logical axis names to mesh axes.

Models only know logical names (`embed`, `heads`, `activation_batch`, ...). A config gives the
mesh shape over the axes (data, fsdp, tensor) and the rules; everything else is derived here.
The shape is that of one slice; `mesh.slices` says how many slices the job spans (-1: the TPU
slices the devices belong to, their `slice_index`; 1 off TPU). The data axis also runs across
the slices, over the data-center network, while fsdp and tensor stay within a slice, so that only
the gradient reduction crosses slices. Devices without TPU slices (CPU, GPU hosts) form one slice
per process with `mesh.slices` = the process count: fsdp within a host, data across hosts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
AUTO_SLICES = -1  # mesh.slices: as many as the devices' TPU slices, 1 elsewhere.
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


def tpu_slices(devices: Sequence[Any]) -> int | None:
  """How many TPU slices `devices` span (distinct `slice_index`); None for other devices."""
  if any(d.platform != "tpu" for d in devices):
    return None
  # Compile-only devices of a single-slice topology have no slice_index: they are slice 0.
  return len({getattr(d, "slice_index", 0) for d in devices})


def resolve_slices(mesh_config: ml_collections.ConfigDict, tpu: int | None, processes: int) -> int:
  """The slice count `mesh_config.slices` means for devices in `tpu` TPU slices (None: devices
  without any) over `processes` processes; ValueError naming the field otherwise."""
  slices = mesh_config.get("slices", AUTO_SLICES)  # Configs older than the field: its default.
  if slices == AUTO_SLICES:
    return tpu or 1
  if slices < 1:
    raise ValueError(f"mesh.slices is {slices}: give a count >= 1, or -1 for the devices' own")
  if tpu is not None and slices != tpu:
    raise ValueError(
      f"mesh.slices is {slices}, but the devices span {tpu} TPU slice(s): set "
      f"--config.mesh.slices={tpu}, or -1 to follow the devices"
    )
  if tpu is None and slices not in (1, processes):
    allowed = "1" if processes == 1 else f"1 or {processes}"
    raise ValueError(
      f"mesh.slices is {slices}: devices without TPU slices (CPU, GPU) make one slice per "
      f"process, and this job has {processes} process(es): set --config.mesh.slices={allowed}"
    )
  return slices


def device_slices(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any]) -> int:
  """The slice count `mesh_config.slices` means on `devices`."""
  processes = len({d.process_index for d in devices})
  return resolve_slices(mesh_config, tpu_slices(devices), processes)


def global_shape(
  mesh_config: ml_collections.ConfigDict, num_devices: int, slices: int
) -> dict[str, int]:
  """Axis sizes of the whole mesh: one slice's `mesh_config` (-1 = the rest) on num_devices /
  slices devices, the data axis times `slices`."""
  if num_devices % slices:
    raise ValueError(f"{num_devices} devices do not split into {slices} equal slices")
  sizes = [mesh_config[a] for a in MESH_AXES]
  shape = dict(zip(MESH_AXES, mesh_shape(sizes, num_devices // slices), strict=True))
  shape["data"] *= slices
  return shape


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over (data, fsdp, tensor) from one slice's `mesh_config.{data,fsdp,tensor}` (-1 =
  the rest); across `mesh_config.slices` slices, data spans them (data x slices)."""
  devices = list(devices if devices is not None else jax.devices())
  slices = device_slices(mesh_config, devices)
  shape = global_shape(mesh_config, len(devices), slices)
  per_slice = (shape["data"] // slices, shape["fsdp"], shape["tensor"])
  # A mesh axis may run across several axes of the chips' torus (fsdp over all 64 chips of a
  # v6e 8 x 8 slice): jax.make_mesh allows that on v5e only.
  if slices == 1:
    grid = mesh_utils.create_device_mesh(per_slice, devices, allow_split_physical_axes=True)
  else:
    dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(
      per_slice,
      dcn,
      devices,
      process_is_granule=tpu_slices(devices) is None,
      allow_split_physical_axes=True,
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


def gathered_over(tree: Any, abstract_boxed: Any, axis: str) -> Any:
  """`tree` (inside jit, under the mesh and logical rules) constrained to the shardings of its
  logical axis names (`abstract_boxed`) with mesh axis `axis` dropped: gathered over `axis`."""

  def drop(target):
    if isinstance(target, (tuple, list)):
      kept = tuple(a for a in target if a != axis)
      return kept or None
    return None if target == axis else target

  rules = tuple((name, drop(target)) for name, target in nn.get_logical_axis_rules())
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), rules)
  return jax.lax.with_sharding_constraint(tree, specs)


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


def padded_batches(
  items: Sequence[dict], keys: Sequence[str], mesh: Mesh, batch_size: int
) -> Iterator[tuple[dict[str, jax.Array], int]]:
  """(global batch of `keys`, number of real rows) over the items of one process, in order.

  Every batch has one size (one compilation), a multiple of the mesh's batch axes; the last is
  padded by repeating its last item.
  """
  multiple = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
  size = math.ceil(min(batch_size, len(items)) / multiple) * multiple
  for start in range(0, len(items), size):
    chunk = list(items[start : start + size])
    real = len(chunk)
    chunk += chunk[-1:] * (size - real)
    yield global_batch({k: np.stack([x[k] for x in chunk]) for k in keys}, mesh), real
