r"""Will it fit? Compiles every step of a config for a Cloud TPU slice, on this machine, no TPU.

  python -m launch.compile --config=configs/refcoco.py:1.3b --topology=v5p-128
  python -m launch.compile --config=configs/refcoco.py:1.3b --topology=v5e-256 --search
  python -m launch.compile --config=configs/genmask.py:14b --topology=v5p-128 --num_slices=2 \
      --config.dit.remat_policy=full --json=fit.json

libtpu's compile-only devices of the slice (--topology takes tpu_pod.py's accelerator names:
v5p-128 is 64 chips, v5litepod-16, v6e-32, v4-32) get the project's own mesh and rules, and the
real TPU compiler builds each step with the kernels the slice runs (splash attention as Mosaic):
the train step at the config's global batch, one-step segmentation (evaluation, predict), the
generation sampler and the VAE's encode and decode (precompute, inference). For each it prints
per-chip HBM (inputs by group, temporaries, peak against the chip's HBM), compile time, the
bytes of each kind of collective per call (and, with --num_slices, what a chip sends to other
slices over the data-center network), the Mosaic kernels and the analytic FLOPs; --json writes
the same.

It exits 1 when a step does not compile or does not fit, naming the knobs. --search compiles the
train step over remat policies x mesh splits x microbatches, cheapest recomputation first, and
prints the first that fits with --headroom of the HBM free, as config overrides.
"""

from __future__ import annotations

import os

# This process only compiles: no backend of this host's accelerators is needed, and none may
# claim them (a training job may be running on them).
os.environ["JAX_PLATFORMS"] = "cpu"
# A compile-only executable cannot be loaded back: keep it out of a persistent cache.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from genmask_jax import config_check  # noqa: E402
from genmask_jax.fit import check, search  # noqa: E402
from genmask_jax.fit.report import GIB, HEADROOM, StepReport  # noqa: E402
from genmask_jax.runs import model as run_model  # noqa: E402
from genmask_jax.runtime import accelerators, fileio, log_filter  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "Accelerator type: v5p-128, v5litepod-16, v6e-32, v4-32, ...", required=True
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network.")
_STEPS = flags.DEFINE_list("steps", list(check.STEPS), f"Steps to compile, of {check.STEPS}.")
_SEGMENT_BATCH = flags.DEFINE_integer("segment_batch", None, "Default: eval.batch_size per host.")
_GENERATE_BATCH = flags.DEFINE_integer("generate_batch", None, "Default: one prompt per chip.")
_VAE_BATCH = flags.DEFINE_integer("vae_batch", None, "Default: eight images per chip.")
_JSON = flags.DEFINE_string("json", None, "Also write the reports here (local or gs://).")
_SEARCH = flags.DEFINE_bool("search", False, "Search remat x mesh x microbatches (train step).")
_HEADROOM = flags.DEFINE_float("headroom", HEADROOM, "--search: HBM fraction left free.")
_EXHAUSTIVE = flags.DEFINE_bool("exhaustive", False, "--search: compile every candidate.")
_POLICIES = flags.DEFINE_list("search_policies", list(search.POLICIES), "--search: remat.")
_MESHES = flags.DEFINE_list(
  "search_meshes",
  ["x".join(map(str, m)) for m in search.MESHES],
  "--search: per-slice meshes DATAxFSDPxTENSOR (-1: the rest).",
)
_MICROBATCHES = flags.DEFINE_list(
  "search_microbatches", [str(m) for m in search.MICROBATCHES], "--search: microbatch counts."
)

COLUMNS = (
  ("step", 10, lambda r: r.step),
  ("compile s", 9, lambda r: f"{r.compile_seconds:.0f}"),
  ("state GiB", 9, lambda r: f"{r.inputs.get('state', 0) / GIB:.2f}"),
  ("vae GiB", 7, lambda r: f"{r.inputs.get('vae', 0) / GIB:.2f}"),
  ("batch GiB", 9, lambda r: f"{r.inputs.get('batch', 0) / GIB:.2f}"),
  ("temp GiB", 8, lambda r: f"{r.temp_bytes / GIB:.2f}" if r.compiled else "-"),
  ("peak GiB", 8, lambda r: f"{r.peak_bytes / GIB:.2f}" if r.compiled else "-"),
  ("HBM", 5, lambda r: f"{r.hbm_fraction:.0%}" if r.compiled else "-"),
  ("fits", 4, lambda r: "yes" if r.fits() else "NO"),
  ("all-gather GiB", 14, lambda r: _collective(r, "all-gather")),
  ("reduce-scatter GiB", 18, lambda r: _collective(r, "reduce-scatter")),
  ("all-reduce GiB", 14, lambda r: _collective(r, "all-reduce")),
  ("permute GiB", 11, lambda r: _collective(r, "collective-permute")),
  ("DCN GiB", 7, lambda r: f"{sum(r.cross_slice.values()) / GIB:.3f}" if r.compiled else "-"),
  ("Mosaic", 6, lambda r: str(r.mosaic_calls) if r.compiled else "-"),
  ("TFLOP", 8, lambda r: f"{r.flops / 1e12:.4g}"),
  ("+remat", 7, lambda r: f"{r.recompute_flops / 1e12:.4g}" if r.step == "train" else ""),
)


def _collective(report: StepReport, kind: str) -> str:
  return f"{report.collectives.get(kind, 0) / GIB:.3f}" if report.compiled else "-"


def table(reports: Sequence[StepReport], prefix: Sequence[tuple[str, int, list[str]]] = ()) -> str:
  """Reports as aligned columns; `prefix` adds leading columns (title, width, one per report)."""
  head = [f"{t:>{w}}" for t, w, _ in prefix] + [f"{t:>{w}}" for t, w, _ in COLUMNS]
  lines = ["  ".join(head)]
  for i, r in enumerate(reports):
    cells = [f"{values[i]:>{w}}" for _, w, values in prefix]
    lines.append("  ".join(cells + [f"{get(r):>{w}}" for _, w, get in COLUMNS]))
  return "\n".join(lines)


def knobs(config, target: check.Target, report: StepReport) -> str:
  """What to change when `report`'s step does not fit or compile."""
  mesh = check.mesh_of(config, target)
  per_shard = {
    t: config.data[t].global_batch_size // (mesh["data"] * mesh["fsdp"])
    for t in ("segmentation", "generation")
  }
  why = (
    f"peak {report.peak_bytes / GIB:.1f} GiB of {report.hbm_bytes / GIB:.1f} GiB per chip"
    if report.compiled
    else report.error.splitlines()[0][:400]
  )
  gathered = ""
  if report.step == "generate" and run_model.gathers_weights(config):
    gathered = (
      "the sampler's gathered weights (--config.generate.gather_weights=False keeps them sharded); "
    )
  return (
    f"step {report.step} does not fit {target.describe()}: {why}\n"
    f"  knobs: {gathered}remat policy (now {config.dit.remat_policy}: "
    "--config.dit.remat_policy=full keeps the least); "
    f"mesh split (now data={mesh['data']} fsdp={mesh['fsdp']} "
    f"tensor={mesh['tensor']}: --config.mesh.tensor=2 splits activations too); per-chip batch "
    f"(now {per_shard['segmentation']} + {per_shard['generation']} samples per batch shard in "
    f"{config.get('microbatches', 1)} microbatches: --config.microbatches=2 halves the "
    f"activations); chips ({target.chips}: a larger --topology or --num_slices); or --search"
  )


def _describe(config, target: check.Target) -> str:
  mesh = check.mesh_of(config, target)
  return (
    f"{target.describe()}\nmesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}; "
    f"attention {check.kernel(config, target)}; remat {config.dit.remat_policy}; DiT "
    f"{config.dit.dtype}; microbatches {config.get('microbatches', 1)}; global batch "
    f"{config.data.segmentation.global_batch_size} + {config.data.generation.global_batch_size}"
  )


def run_search(config, target: check.Target) -> int:
  rows = search.rows(
    config,
    target,
    _POLICIES.value,
    [tuple(int(n) for n in m.split("x")) for m in _MESHES.value],
    [int(m) for m in _MICROBATCHES.value],
  )
  print(f"search over {len(rows)} candidates for {target.describe()}, train step:", flush=True)

  def show(row: search.Row) -> None:
    r = row.report
    if r is None:
      outcome = f"skipped: {row.skipped}"
    elif r.compiled:
      outcome = (
        f"peak {r.peak_bytes / GIB:.2f} GiB ({r.hbm_fraction:.0%}), "
        f"compile {r.compile_seconds:.0f} s"
      )
    else:
      outcome = f"does not compile ({r.compile_seconds:.0f} s): {r.error.splitlines()[0][:200]}"
    print(
      f"  {row.candidate.describe()}, {row.per_shard_batch[0]} + {row.per_shard_batch[1]} "
      f"samples per batch shard: +{row.recompute_flops / 1e12:.0f} TFLOP recompute, {outcome}",
      flush=True,
    )

  choice = search.search(config, target, rows, _HEADROOM.value, _EXHAUSTIVE.value, show)
  compiled = [row for row in rows if row.report is not None]
  print(
    table(
      [row.report for row in compiled],
      [
        ("remat", 18, [row.candidate.remat for row in compiled]),
        ("mesh", 8, ["x".join(map(str, row.candidate.mesh)) for row in compiled]),
        ("micro", 5, [str(row.candidate.microbatches) for row in compiled]),
      ],
    )
  )
  if _JSON.value:
    fileio.write_json(
      _JSON.value,
      {
        "target": target.describe(),
        "rows": [
          dict(
            vars(row.candidate), per_shard_batch=row.per_shard_batch, report=row.report.to_json()
          )
          for row in compiled
        ],
        "choice": vars(choice.candidate) if choice else None,
      },
      indent=1,
    )
  if choice is None:
    print(f"nothing fits with {_HEADROOM.value:.0%} headroom", file=sys.stderr)
    return 1
  data, fsdp, tensor = choice.candidate.mesh
  print(
    f"choice: {choice.candidate.describe()} (least recompute with >= {_HEADROOM.value:.0%} HBM "
    f"free): --config.dit.remat_policy={choice.candidate.remat} --config.mesh.data={data} "
    f"--config.mesh.fsdp={fsdp} --config.mesh.tensor={tensor} "
    f"--config.microbatches={choice.candidate.microbatches}"
  )
  return 0


def main(argv: list[str]) -> int:
  del argv
  log_filter.quiet_library_logs()
  config = _CONFIG.value
  try:
    target = check.Target(accelerators.parse(_TOPOLOGY.value), _NUM_SLICES.value)
  except ValueError as e:
    raise app.UsageError(f"--topology: {e}") from e
  try:
    check.validate(config, target)
    if _SEARCH.value:
      return run_search(config, target)
    print(_describe(config, target), flush=True)
    batches = check.Batches(_SEGMENT_BATCH.value, _GENERATE_BATCH.value, _VAE_BATCH.value)
    reports = check.compile_for(config, target, _STEPS.value, batches)
  except config_check.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(table(reports))
  if _JSON.value:
    fileio.write_json(
      _JSON.value,
      {"target": target.describe(), "steps": [r.to_json() for r in reports]},
      indent=1,
    )
  failed = [r for r in reports if not r.fits()]
  for r in failed:
    print(knobs(config, target, r), file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
