"""Cloud TPU accelerator types (`v5p-128`, `v5litepod-16`, `v6e-32`, `v4-32`) and their slices.

A name is a family and a count: TensorCores for v4 and v5p (two per chip, one JAX device per
chip in megacore mode), chips for v5e (`v5litepod`) and v6e. The physical layout (the topology
libtpu compiles for), the hosts a slice spans and the HBM the TPU compiler lets a program use
follow from the name.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Family:
  topology_prefix: str  # libtpu's topology family name.
  cores_per_chip: int  # Per unit of the accelerator name's count.
  chips_per_host: int  # Of a multi-host slice.
  max_single_host_chips: int  # Larger slices span several hosts.
  # HBM per chip that the TPU compiler (libtpu 0.0.42) gives a program: its "available HBM" of
  # the RESOURCE_EXHAUSTED error (tests/test_compile.py checks it). The datasheets say v4 32 GiB,
  # v5e 16 GB, v5p 95 GB, v6e 32 GB.
  usable_hbm_bytes: int
  # Chip grids of the slice sizes Cloud TPU offers, by chip count.
  layouts: dict[int, tuple[int, ...]]


_CUBES = {  # v4 and v5p: 3D tori of 4-chip hosts.
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
}
_GRIDS = {  # v5e and v6e: 2D grids.
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}

FAMILIES = {
  "v4": Family("v4", 2, 4, 4, int(30.75 * GIB), _CUBES),
  "v5p": Family("v5p", 2, 4, 4, int(95.74 * GIB), _CUBES),
  "v5litepod": Family("v5e", 1, 4, 8, int(15.75 * GIB), _GRIDS),
  "v6e": Family("v6e", 1, 4, 8, int(31.25 * GIB), _GRIDS),
}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One slice of a Cloud TPU accelerator type."""

  name: str  # As gcloud takes it, e.g. v5p-128.
  family: Family
  chips: int

  @property
  def layout(self) -> tuple[int, ...]:
    return self.family.layouts[self.chips]

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. v5p:4x4x4."""
    return f"{self.family.topology_prefix}:{'x'.join(map(str, self.layout))}"

  @property
  def hosts(self) -> int:
    if self.chips <= self.family.max_single_host_chips:
      return 1
    return self.chips // self.family.chips_per_host

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def host_layout(self) -> tuple[int, int, int]:
    """The chips of one host as libtpu lays them out: a single-host slice's are all of its chips."""
    return (*(self.layout if self.hosts == 1 else (2, 2)), 1, 1)[:3]

  @property
  def chip_config(self) -> str:
    """libtpu's chip configuration: a two-core chip is one device ("megacore")."""
    return "megacore" if self.family.cores_per_chip == 2 else "default"

  @property
  def hbm_bytes(self) -> int:
    return self.family.usable_hbm_bytes


def parse(name: str) -> Accelerator:
  """The slice a Cloud accelerator type names; ValueError naming what is known otherwise."""
  family_name, _, count = name.rpartition("-")
  if family_name == "v5e":
    family_name = "v5litepod"
  family = FAMILIES.get(family_name)
  if family is None or not count.isdigit():
    raise ValueError(
      f"accelerator type {name!r}: expected FAMILY-COUNT with FAMILY one of "
      f"{sorted(FAMILIES)} (e.g. v5p-128, v5litepod-16, v6e-32, v4-32)"
    )
  cores = int(count)
  chips = cores // family.cores_per_chip
  if cores % family.cores_per_chip or chips not in family.layouts:
    sizes = [c * family.cores_per_chip for c in family.layouts]
    raise ValueError(f"accelerator type {name!r}: {family_name} comes in sizes {sizes}")
  return Accelerator(name, family, chips)
