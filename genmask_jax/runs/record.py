"""A training run's directory describes itself: `<workdir>/run.json`, the run record.

Training (process 0) writes it every time it starts; inference, evaluation and the demo open
the run from it (inference/genmask.py):
  config  the resolved config the run trains with (`config.to_dict()`)
  vae     the frozen VAE's identity (runs/model.vae_identity): `weights` (the converted folder,
          "" for a random initialization), `random_init_seed` (that initialization's seed,
          else null) and `fingerprint` (settings, latent statistics, parameters)
  vlm     what the text features were computed with: `encoder_model_id`, `prompt_template`,
          `image_policy` (vlm/image_policy.py, from the training feature stores) and
          `store_dtype` (their precision, which in-process features are rounded to as well)

A config that changes a field that shapes the model (MODEL_FIELDS) is refused naming the field
and the run (`check_config`), and so is a frozen VAE whose fingerprint is not the run's
(`check_vae`), so that nothing silently runs with random weights or other statistics.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from genmask_jax.data import tasks
from genmask_jax.data.features import FeatureReader
from genmask_jax.runs.model import describe_vae, vae_identity
from genmask_jax.runtime import fileio

RUN_FILE = "run.json"
FORMAT_VERSION = 1
# Config fields whose values the trained weights only fit: the architectures, the frozen VAE's
# latent statistics, the loss format (mask head), what the DiT reads, and the resolutions.
MODEL_FIELDS = (
  "dit",
  "vae",
  "diffusion.segmentation_loss",
  "diffusion.use_condition_tokens",
  "data.text_len",
  "data.segmentation.resolution",
  "data.generation.resolution",
)
# How the model runs, not what it is: free to change (e.g. cuDNN attention on a GPU).
EXECUTION_FIELDS = (
  "dit.dtype",
  "dit.attention",
  "dit.attention_block_sizes",
  "dit.remat_policy",
  "dit.scan_unroll",
  "vae.dtype",
)
# How to write a run record for a run that has checkpoints but none: start its training again
# with the same command; it writes run.json before its first step and resumes where it stopped.
REWRITE = "python -m genmask_jax.main --config=<its training config> --workdir={workdir}"


class RunError(ValueError):
  """A run directory lacks what its model needs, or does not match the config or VAE given."""


def _under(field: str, prefixes: Sequence[str]) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Dotted paths to JSON-normalized leaves (tuples become lists, as in run.json)."""
  if isinstance(tree, Mapping):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}


def model_field_changes(recorded: Mapping, config: Mapping) -> list[tuple[str, Any, Any]]:
  """(field, the run's value, the config's value) of each model field that differs. Fields the
  run does not record (added to the code after it) are not compared."""
  old, new = _flatten(recorded), _flatten(config)
  return [
    (field, value, new.get(field, "<absent>"))
    for field, value in old.items()
    if _under(field, MODEL_FIELDS)
    and not _under(field, EXECUTION_FIELDS)
    and new.get(field, "<absent>") != value
  ]


def check_config(record: Mapping, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config whose model fields differ from those the run trained with."""
  changes = model_field_changes(record["config"], config.to_dict())
  if changes:
    listed = "; ".join(f"{f} is {old!r} in the run, {new!r} here" for f, old, new in changes)
    raise RunError(
      f"run {workdir}: {listed}. These fields shape the model the run trained: drop them from "
      "the overrides (the run's config is used by default) or train a new run in another workdir"
    )


def check_vae(
  record: Mapping, config: ml_collections.ConfigDict, fingerprint: str, workdir: str
) -> None:
  """Refuses a frozen VAE that is not the run's."""
  recorded = record["vae"]
  if fingerprint != recorded["fingerprint"]:
    given = describe_vae(vae_identity(config, fingerprint))
    raise RunError(
      f"run {workdir}: its frozen VAE is {describe_vae(recorded)} (fingerprint "
      f"{recorded['fingerprint'][:12]}), this config gives {given} (fingerprint "
      f"{fingerprint[:12]}): the VAE's parameters, settings or latent statistics differ. Use "
      "the run's VAE (drop the init.vae_weights / seed overrides), or train a new run"
    )


def vlm_settings(config: ml_collections.ConfigDict) -> dict:
  """The text encoder of the run's feature stores: one image policy for all segmentation
  stores (else the VLM would see user images inconsistently); their precision if shared."""
  sources = {t: [s["features"] for s in config.data[t].sources] for t in tasks.NAMES}
  metas = {path: FeatureReader(path).meta for paths in sources.values() for path in paths}
  policies = {json.dumps(metas[p].image_policy, sort_keys=True): p for p in sources["segmentation"]}
  if len(policies) > 1:
    raise RunError(
      f"the segmentation feature stores were encoded with different image policies: {policies}; "
      "re-encode them with one (launch/precompute_vlm.py --image_resize / --max_pixels)"
    )
  dtypes = {m.dtype for m in metas.values()}
  return {
    "encoder_model_id": config.data.encoder_model_id,
    "prompt_template": config.data.prompt_template,
    "image_policy": json.loads(policies.popitem()[0]) if policies else None,
    "store_dtype": dtypes.pop() if len(dtypes) == 1 else None,
  }


def training_record(config: ml_collections.ConfigDict, fingerprint: str) -> dict:
  return {
    "format_version": FORMAT_VERSION,
    "config": config.to_dict(),
    "vae": vae_identity(config, fingerprint),
    "vlm": vlm_settings(config),
  }


def write_record(workdir: str, record: Mapping) -> None:
  fileio.makedirs(workdir)
  fileio.write_json(os.path.join(workdir, RUN_FILE), record, indent=2)


def read_record(workdir: str) -> dict | None:
  """run.json of the run under `workdir`; None when the folder holds no run (no run.json and no
  checkpoints: e.g. converted weights). A run of another format, or checkpoints without
  run.json, is a RunError naming the command that rewrites it."""
  path = os.path.join(workdir, RUN_FILE)
  rewrite = REWRITE.format(workdir=workdir)
  if not fileio.exists(path):
    if fileio.isdir(os.path.join(workdir, "checkpoints")):
      raise RunError(
        f"run {workdir}: checkpoints but no {RUN_FILE}, which records the run's config, frozen "
        f"VAE and VLM settings; write it by resuming the training: {rewrite}"
      )
    return None
  record = fileio.read_json(path, RunError)
  if record.get("format_version") != FORMAT_VERSION:
    raise RunError(
      f"{path}: run record format {record.get('format_version')}, this code reads "
      f"{FORMAT_VERSION}; rewrite it by resuming the training: {rewrite}"
    )
  return record


def _tuples(tree: Any) -> Any:
  """JSON lists back to the tuples the model configs use; lists of dicts (sources, splits)
  stay lists, and so do empty ones (no model field is an empty tuple)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    items = [_tuples(v) for v in tree]
    return items if not items or any(isinstance(v, dict) for v in items) else tuple(items)
  return tree


def config_from_dict(saved: Mapping) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuples(copy.deepcopy(dict(saved))))


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
  """A copy of `config` with overrides `field=value` (or `--config.field=value`, as on a command
  line), each value parsed as ml_collections' config flags parse it for that field's type."""
  config = copy.deepcopy(config)
  if not overrides:
    return config
  argv = ["overrides", *(o if o.startswith("-") else f"--config.{o}" for o in overrides)]
  values = flags.FlagValues()  # Apart from the global flags: the caller's may hold a --config.
  config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config
