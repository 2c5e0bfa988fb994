"""Compiles a step for a target and reports what one chip holds, what crosses chips, and whether
it fits the chip's HBM.

Per-chip memory, from the compiler's buffer assignment: the step's inputs by group (train state
or parameters, the frozen VAE, the batch), temporaries (activations and scratch), and the peak:
inputs + outputs - donated inputs + temporaries. A
program that exceeds the chip's HBM fails to compile on TPU (RESOURCE_EXHAUSTED): that is
reported as not fitting, with the compiler's message.
"""

from __future__ import annotations

import dataclasses
import time

from jax._src import config as jax_config

from genmask_jax.fit import hlo
from genmask_jax.fit.steps import Step, per_chip_bytes

GIB = 2**30
HEADROOM = 0.10  # What a config that "fits" leaves free of the chip's HBM, by default.


@dataclasses.dataclass
class StepReport:
  step: str
  chips: int
  hbm_bytes: int
  inputs: dict[str, int]  # Per-chip bytes by input group.
  flops: int  # Analytic, all chips, one call.
  recompute_flops: int = 0
  compile_seconds: float = 0.0
  temp_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  peak_bytes: int = 0
  collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # Bytes per call.
  cross_slice: dict[str, int] = dataclasses.field(default_factory=dict)  # Bytes sent over DCN.
  mosaic_calls: int = 0  # Pallas kernels (splash attention) compiled for the TPU.
  error: str = ""  # The compiler's message when it failed.

  @property
  def compiled(self) -> bool:
    return not self.error

  @property
  def out_of_memory(self) -> bool:
    return "RESOURCE_EXHAUSTED" in self.error

  def fits(self, headroom: float = 0.0) -> bool:
    return self.compiled and self.peak_bytes <= (1 - headroom) * self.hbm_bytes

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), fits=self.fits(), hbm_fraction=self.hbm_fraction)

  @property
  def hbm_fraction(self) -> float:
    return self.peak_bytes / self.hbm_bytes


def compile_step(step: Step, chips: int, hbm_bytes: int) -> StepReport:
  """Lowers and compiles `step`; a compiler error (out of memory included) is reported, not
  raised. Anything else (a bad config, a tracing error) raises."""
  report = StepReport(
    step.name,
    chips,
    hbm_bytes,
    {name: per_chip_bytes(tree) for name, tree in step.inputs.items()},
    step.flops,
    step.recompute_flops,
  )
  start = time.perf_counter()
  lowered = step.lower()
  try:
    # A program for compile-only devices cannot be loaded back: keep it out of JAX's cache.
    # (JAX decides once per process, at its first compilation: a process that compiled for its
    # own devices with the cache on tries the cache, fails to load and compiles.)
    with jax_config.enable_compilation_cache(False):
      compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XLA raises its own error types; all mean "no program".
    report.compile_seconds = time.perf_counter() - start
    report.error = f"{type(e).__name__}: {e}"
    return report
  report.compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  report.temp_bytes = memory.temp_size_in_bytes
  report.output_bytes = memory.output_size_in_bytes
  report.alias_bytes = memory.alias_size_in_bytes
  report.peak_bytes = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )
  text = compiled.as_text()
  report.collectives = hlo.collective_bytes(text)
  report.cross_slice = hlo.cross_slice_bytes(text)
  report.mosaic_calls = hlo.mosaic_calls(text)
  return report
