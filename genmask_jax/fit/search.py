"""The least recomputation that fits: remat policies x mesh splits x microbatches of a config's
train step, compiled for a target in order of their cost until one fits with headroom.

Candidates are ordered by the FLOPs their remat policy adds (models/flops.py), then by the
number of microbatches (fewer: larger matmuls, fewer weight gathers), then by the order of the
mesh splits given, then by the activation memory the policy keeps (less first). The first that
fits with `headroom` of the chip's HBM free is the choice; `exhaustive` compiles every candidate
for the table instead of stopping there. A candidate is skipped, not compiled, when a leaner
policy on the same mesh and microbatches was already out of memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import ml_collections

from genmask_jax.fit import check
from genmask_jax.fit.report import StepReport
from genmask_jax.models import attention, flops
from genmask_jax.models.dit import REMAT_POLICIES

POLICIES = ("none", *REMAT_POLICIES)
# Policies by the activation memory they keep, least first (benchmarks/remat_memory.py, with the
# XLA kernel): among equal recomputation the search tries the leaner one first.
BY_MEMORY = ("full", "save_attention", "save_attention_ffn", "dots_no_batch", "dots_attention",
             "dots", "none")  # fmt: skip


def memory_rank(policy: str, kernel: str) -> int:
  """`policy`'s place in BY_MEMORY. A flash kernel is no dot: under "dots" it keeps what it
  keeps under "dots_no_batch" (the XLA kernel's batched score matrices are what "dots" adds)."""
  if policy == "dots" and kernel in attention.FLASH_KERNELS:
    policy = "dots_no_batch"
  return BY_MEMORY.index(policy)


MESHES = ((1, -1, 1), (1, -1, 2), (2, -1, 1))  # (data, fsdp, tensor) per slice.
MICROBATCHES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Candidate:
  remat: str
  mesh: tuple[int, int, int]
  microbatches: int

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    out = config.copy_and_resolve_references()
    out.dit.remat_policy = self.remat
    out.mesh.update(dict(zip(("data", "fsdp", "tensor"), self.mesh, strict=True)))  # Slices kept.
    out.microbatches = self.microbatches
    return out

  def describe(self) -> str:
    data, fsdp, tensor = self.mesh
    return (
      f"remat {self.remat}, mesh data={data} fsdp={fsdp} tensor={tensor}, "
      f"microbatches {self.microbatches}"
    )


@dataclasses.dataclass
class Row:
  candidate: Candidate
  # Segmentation and generation samples per batch shard (data x fsdp; a tensor group shares
  # them) and microbatch.
  per_shard_batch: tuple[int, int]
  recompute_flops: int
  report: StepReport | None = None  # None: not compiled (the search stopped before it).
  skipped: str = ""  # Why it was not compiled.


def _per_shard(config, target: check.Target, candidate: Candidate) -> tuple[int, int] | None:
  """Samples per batch shard and microbatch of each task; None if the batch does not split so."""
  shape = check.mesh_of(candidate.apply(config), target)
  shards = shape["data"] * shape["fsdp"]
  sizes = []
  for task in ("segmentation", "generation"):
    size = config.data[task].global_batch_size if config.data[task].sources or not sizes else 0
    if size % (shards * candidate.microbatches):
      return None
    sizes.append(size // (shards * candidate.microbatches))
  return sizes[0], sizes[1]


def rows(
  config: ml_collections.ConfigDict,
  target: check.Target,
  policies: Sequence[str] = POLICIES,
  meshes: Sequence[tuple[int, int, int]] = MESHES,
  microbatches: Sequence[int] = MICROBATCHES,
) -> list[Row]:
  """The candidates whose batches split over the target, cheapest first (module docstring)."""
  kernel = check.kernel(config, target)
  resolution = config.data.segmentation.resolution
  out = []
  for m, mesh in enumerate(meshes):
    for count in microbatches:
      for policy in policies:
        candidate = Candidate(policy, tuple(mesh), count)
        try:
          per_shard = _per_shard(config, target, candidate)
        except ValueError:  # The split does not divide the slice's chips.
          continue
        if per_shard is None or config.dit.num_heads % candidate.mesh[2]:
          continue
        candidate_config = candidate.apply(config)
        sizes = [config.data[t].global_batch_size for t in ("segmentation", "generation")]
        recompute = flops.train_step_recompute_flops(
          candidate_config, sizes[0], sizes[1], resolution, kernel
        )
        key = (recompute, count, m, memory_rank(policy, kernel))
        out.append((key, Row(candidate, per_shard, recompute)))
  return [row for _, row in sorted(out, key=lambda item: item[0])]


def search(
  config: ml_collections.ConfigDict,
  target: check.Target,
  candidates: list[Row],
  headroom: float,
  exhaustive: bool = False,
  on_row: Callable[[Row], None] = lambda row: None,
) -> Row | None:
  """Compiles `candidates` in order (each row's report is filled in) until one fits with
  `headroom` (all of them if `exhaustive`); returns that one, or None."""
  kernel = check.kernel(config, target)
  rank = lambda candidate: memory_rank(candidate.remat, kernel)
  choice, out_of_memory = None, []
  for row in candidates:
    c = row.candidate
    leaner = [
      o.remat
      for o in out_of_memory
      if (o.mesh, o.microbatches) == (c.mesh, c.microbatches) and rank(o) <= rank(c)
    ]
    if leaner:
      row.skipped = f"remat {leaner[0]} keeps no more and did not fit"
    else:
      (row.report,) = check.compile_for(c.apply(config), target, ("train",))
      if row.report.out_of_memory or (row.report.compiled and not row.report.fits()):
        out_of_memory.append(c)
    on_row(row)
    if choice is None and row.report is not None and row.report.fits(headroom):
      choice = row
      if not exhaustive:
        break
  return choice
