"""The command line of a trained run: its flags (predict, generate) and its argv (those and
`genmask_jax.main --mode=eval`).

The run is the one under --workdir with its own config (run.json); --config and --config.x=y
overrides apply on top, and a change to a field that shapes the model is refused
(genmask_jax/inference/genmask.py). absl parses `--config.x=y` only with a --config file, so
`parse_flags` takes the overrides out of argv when none is given and hands them to main.
Texts are encoded in-process by --vlm or read from --features for the --sample_id samples of
--records.
"""

from __future__ import annotations

import re
import types
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from genmask_jax import GenMask
from genmask_jax.data import records
from genmask_jax.vlm.in_process import VLM

_OVERRIDE = re.compile(r"^--?(no)?config\.")
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without them, the `--config.x=y` overrides) when argv gives no --config file;
  with one, ml_collections parses its overrides itself and nothing is split."""
  if any(_CONFIG_FLAG.match(a) for a in argv):
    return list(argv), []
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if not _OVERRIDE.match(arg):
      rest.append(arg)
      continue
    overrides.append(arg)
    if "=" not in arg and not arg.startswith(("-noconfig", "--noconfig")):
      following = next(args, None)  # `--config.x value`, unless a bare boolean flag.
      if following is not None and following.startswith("-"):
        rest.append(following)
      elif following is not None:
        overrides[-1] = f"{arg}={following}"
  return rest, overrides


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for commands whose --config defaults to the run's: overrides given
  without --config come back after the positional arguments, for `overrides_of`."""
  rest, overrides = split_overrides(argv)
  return [*app.parse_flags_with_usage(rest), *overrides]


def overrides_of(argv: Sequence[str]) -> list[str]:
  """The overrides `parse_flags` passed to main; any other argument is a usage error."""
  extra = [a for a in argv[1:] if not _OVERRIDE.match(a)]
  if extra:
    raise app.UsageError(f"unexpected arguments: {extra}")
  return list(argv[1:])


def define() -> types.SimpleNamespace:
  """Defines the flags predict and generate share; returns their holders by name."""
  return types.SimpleNamespace(
    config=config_flags.DEFINE_config_file(
      "config", None, "Optional: a config to use instead of the run's own (checked against it)."
    ),
    workdir=flags.DEFINE_string(
      "workdir", None, "Training workdir: its config and latest checkpoint.", required=True
    ),
    records=flags.DEFINE_string("records", None, "Sample store holding the --sample_id samples."),
    sample_id=flags.DEFINE_multi_string(
      "sample_id",
      [],
      "A sample of --records; repeatable (a run's eval/<split>_per_sample.json lists ids).",
    ),
    features=flags.DEFINE_string("features", None, "Feature store of --records (precomputed)."),
    vlm=flags.DEFINE_string("vlm", None, "Qwen2.5-VL directory: encode the texts in-process."),
    vlm_model_id=flags.DEFINE_string("vlm_model_id", None, "Encoder name; default: --vlm's name."),
    vlm_device=flags.DEFINE_string("vlm_device", "cpu", "torch device of the VLM."),
    vlm_dtype=flags.DEFINE_enum(
      "vlm_dtype", "float32", ["float32", "bfloat16", "float16"], "torch dtype of the VLM."
    ),
    batch_size=flags.DEFINE_integer("batch_size", 8, "Queries per forward pass."),
  )


def open_run(run: types.SimpleNamespace, argv: Sequence[str]) -> GenMask:
  """The --workdir run with --config and the overrides `parse_flags` left in argv, and the
  --vlm; exactly one of --vlm and --features must be given."""
  if (run.vlm.value is None) == (run.features.value is None):
    raise app.UsageError("give exactly one of --vlm (encode in-process) and --features")
  vlm = None
  if run.vlm.value is not None:
    vlm = VLM(
      run.vlm.value,
      run.vlm_model_id.value,
      run.vlm_device.value,
      run.vlm_dtype.value,
      run.batch_size.value,
    )
  return GenMask.open(
    run.workdir.value, overrides=overrides_of(argv), config=run.config.value, vlm=vlm
  )


def samples(
  run: types.SimpleNamespace, task: str, texts: Sequence[str], images: Sequence[str] = ()
) -> list[records.Sample]:
  """The queries given on the command line (segmentation: one text per image, or one for all;
  generation: the texts are the prompts), then the --sample_id samples of --records."""
  if task == "segmentation":
    texts = list(texts) * len(images) if len(texts) == 1 else texts
    if len(texts) != len(images):
      raise app.UsageError(
        f"give one --text per --image, or one for all: got {len(images)} images, {len(texts)} texts"
      )
    given = records.query_samples(images, texts)
  else:
    given = records.caption_samples(texts)
  store = []
  if run.sample_id.value:
    if run.records.value is None:
      raise app.UsageError("--sample_id needs --records, the sample store holding it")
    store = records.RecordReader(run.records.value).get_all(run.sample_id.value, task)
  if not given and not store:
    raise app.UsageError("nothing to do: give queries on the command line or --sample_id")
  if run.features.value is not None and given:
    raise app.UsageError("--features holds store samples only: encode other queries with --vlm")
  return given + store
