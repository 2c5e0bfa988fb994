"""The flags launch/predict.py and launch/generate.py share, over genmask_jax/inference/run.py (the
trained model) and genmask_jax/inference/queries.py (queries, their features, batches).

The model is the run under --workdir with its own config (run.json, or the config its
checkpoints hold); --config and --config.x=y overrides apply on top, and a change to a field
that shapes the model is refused. Texts are encoded in-process by --vlm (images given to it by
the run's image policy) or read from --features for the --sample_id samples of --records.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from genmask_jax.inference import queries, run

CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Optional: a config to use instead of the run's own (checked against it)."
)
WORKDIR = flags.DEFINE_string(
  "workdir", None, "Training workdir: its config and latest checkpoint.", required=True
)
_RECORDS = flags.DEFINE_string("records", None, "Sample store holding the --sample_id samples.")
_SAMPLE_ID = flags.DEFINE_multi_string(
  "sample_id",
  [],
  "A sample of --records; repeatable (a run's eval/<split>_per_sample.json lists ids).",
)
_FEATURES = flags.DEFINE_string("features", None, "Feature store of --records (precomputed).")
_VLM = flags.DEFINE_string("vlm", None, "Qwen2.5-VL directory: encode the texts in-process.")
_VLM_MODEL_ID = flags.DEFINE_string("vlm_model_id", None, "Encoder name; default: --vlm's name.")
_VLM_DEVICE = flags.DEFINE_string("vlm_device", "cpu", "torch device of the VLM.")
_VLM_DTYPE = flags.DEFINE_enum(
  "vlm_dtype", "float32", ["float32", "bfloat16", "float16"], "torch dtype of the VLM."
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Queries per forward pass.")


def run_config(argv: Sequence[str]) -> run.RunConfig:
  """The --workdir run's config, with --config and the overrides `run.parse_flags` left in
  argv; its weights load later (`run.load`), once the VLM is done with the accelerator."""
  return run.resolve(WORKDIR.value, run.overrides_of(argv), CONFIG.value)


def store_records(task: str) -> list[queries.Sample]:
  """The --sample_id samples of --records, in order."""
  if not _SAMPLE_ID.value:
    return []
  if _RECORDS.value is None:
    raise app.UsageError("--sample_id needs --records, the sample store holding it")
  return queries.store_records(_RECORDS.value, _SAMPLE_ID.value, task)


def text_features(
  spec: run.RunConfig, samples: Sequence[queries.Sample], reasoning: bool = False
) -> list[np.ndarray]:
  """(L, D) hidden states per sample: computed by the --vlm, or those stored under the sample
  ids in --features (store samples only)."""
  if not samples:
    raise app.UsageError("nothing to do: give queries on the command line or --sample_id")
  if (_VLM.value is None) == (_FEATURES.value is None):
    raise app.UsageError("give exactly one of --vlm (encode in-process) and --features")
  if _VLM.value is not None:
    vlm = queries.VLMOptions(
      _VLM.value, _VLM_MODEL_ID.value, _VLM_DEVICE.value, _VLM_DTYPE.value, BATCH_SIZE.value
    )
    return queries.vlm_features(spec, samples, vlm, reasoning)
  if len(samples) != len(_SAMPLE_ID.value):
    raise app.UsageError("--features holds store samples only: encode other queries with --vlm")
  return queries.store_features(spec, samples, _FEATURES.value, reasoning)
