"""A training run's directory describes itself: inference, evaluation and the demo open it here.

`<workdir>/run.json`, written by training (process 0) every time it starts:
  config  the resolved config the run trains with (`config.to_dict()`)
  vae     the frozen VAE's identity: `weights` (the converted folder, "" for a random
          initialization), `random_init_seed` (that initialization's seed, else null) and
          `fingerprint` (data/encode_latents.vae_fingerprint: settings, latent statistics,
          parameters)
  vlm     what the text features were computed with: `encoder_model_id`, `prompt_template`,
          `image_policy` (vlm/image_policy.py, from the training feature stores) and
          `store_dtype` (their precision, which in-process features are rounded to as well)

`open_run(workdir, overrides, config)` rebuilds the trained model: the run's config (or an
explicit `config`) with command-line overrides on top. A change to a field that shapes the model
(MODEL_FIELDS) is refused naming the field and the run, and so is a frozen VAE whose fingerprint
is not the run's, so that nothing silently runs with random weights or other statistics. Runs
made before run.json existed are read from the config their checkpoints hold; they have no VAE
fingerprint, so their VAE is rebuilt from that config unverified (with a warning).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from flax import linen as nn
from ml_collections import config_flags

from genmask_jax.data import encode_latents
from genmask_jax.data.features import FeatureReader
from genmask_jax.data.records import TASKS
from genmask_jax.inference import model as inference
from genmask_jax.models.genmask import Models, vae_init_seed
from genmask_jax.runtime import fileio, sharding
from genmask_jax.training import checkpointing
from genmask_jax.vlm import image_policy

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
_OVERRIDE = re.compile(r"^--?(no)?config\.")
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")


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


def describe_vae(identity: Mapping) -> str:
  if identity.get("weights"):
    return f"weights {identity['weights']}"
  return f"a random initialization (seed {identity.get('random_init_seed')})"


def vae_identity(config: ml_collections.ConfigDict, fingerprint: str | None) -> dict:
  weights = config.init.vae_weights
  return {
    "weights": fileio.absolute(weights) if weights else "",
    "random_init_seed": vae_init_seed(config),
    "fingerprint": fingerprint,
  }


def check_vae(
  record: Mapping, config: ml_collections.ConfigDict, fingerprint: str, workdir: str
) -> bool:
  """Refuses a frozen VAE that is not the run's; False when the run recorded no fingerprint
  (made before run.json), i.e. when it cannot be verified."""
  recorded = record["vae"]
  if recorded.get("fingerprint") is None:
    return False
  if fingerprint != recorded["fingerprint"]:
    given = describe_vae(vae_identity(config, None))
    raise RunError(
      f"run {workdir}: its frozen VAE is {describe_vae(recorded)} (fingerprint "
      f"{recorded['fingerprint'][:12]}), this config gives {given} (fingerprint "
      f"{fingerprint[:12]}): the VAE's parameters, settings or latent statistics differ. Use "
      "the run's VAE (drop the init.vae_weights / seed overrides), or train a new run"
    )
  return True


def vlm_settings(config: ml_collections.ConfigDict) -> dict:
  """The text encoder of the run's feature stores: one image policy for all segmentation
  stores (else the VLM would see user images inconsistently); their precision if shared."""
  sources = {t: [s["features"] for s in config.data[t].sources] for t in TASKS}
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


def _checkpoint_config(workdir: str) -> dict | None:
  directory = os.path.join(workdir, "checkpoints")
  if not fileio.isdir(directory):
    return None
  ckpt = checkpointing.TrainCheckpoints(directory, keep=1, every=1, async_save=False)
  try:
    step = ckpt.latest_step()
    return None if step is None else ckpt.restore_config(step)
  finally:
    ckpt.close()


def read_record(workdir: str) -> dict | None:
  """run.json; for a run made before it, what its latest checkpoint's config says (no VAE
  fingerprint, no image policy); None when there is neither."""
  path = os.path.join(workdir, RUN_FILE)
  if fileio.exists(path):
    return fileio.read_json(path, RunError)
  saved = _checkpoint_config(workdir)
  if saved is None:
    return None
  config = config_from_dict(saved)
  return {
    "format_version": 0,
    "config": saved,
    "vae": vae_identity(config, None),
    "vlm": {
      "encoder_model_id": config.data.encoder_model_id,
      "prompt_template": config.data.prompt_template,
      "image_policy": None,
      "store_dtype": None,
    },
  }


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
  """A copy of `config` with command-line overrides (`--config.x.y=value`) parsed as
  ml_collections' config flags parse them."""
  config = copy.deepcopy(config)
  if not overrides:
    return config
  values = flags.FlagValues()
  argv = ["run", *overrides]
  config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


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
  without --config come back after the positional arguments, for `open_run`."""
  rest, overrides = split_overrides(argv)
  return [*app.parse_flags_with_usage(rest), *overrides]


def overrides_of(argv: Sequence[str]) -> list[str]:
  """The overrides `parse_flags` passed to main; any other argument is a usage error."""
  extra = [a for a in argv[1:] if not _OVERRIDE.match(a)]
  if extra:
    raise app.UsageError(f"unexpected arguments: {extra}")
  return list(argv[1:])


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What a run is, before its weights load: the config to run it with and its record."""

  workdir: str
  config: ml_collections.ConfigDict
  record: dict | None  # None: a folder of converted weights, no training run.

  @property
  def vlm(self) -> dict:
    """The run's VLM settings (see the module docstring); empty if it has no record."""
    return (self.record or {}).get("vlm", {})

  @property
  def image_policy(self) -> image_policy.ImagePolicy:
    """How the training features' images were given to the VLM (defaults if not recorded)."""
    return image_policy.from_record(self.vlm.get("image_policy"))


def resolve(
  workdir: str,
  overrides: Sequence[str] = (),
  config: ml_collections.ConfigDict | None = None,
) -> RunConfig:
  """The run's config unless `config` is given, overrides on top, model fields checked against
  the run. A folder with no record and no checkpoint needs `config` (its converted weights)."""
  record = read_record(workdir)
  if record is None and config is None:
    raise RunError(
      f"run {workdir}: no {RUN_FILE} and no checkpoint holding a config; give the training "
      "config (--config) or the workdir of a training run"
    )
  base = config if config is not None else config_from_dict(record["config"])
  resolved = apply_overrides(base, overrides)
  if record is not None:
    check_config(record, resolved, workdir)
  return RunConfig(workdir, resolved, record)


@dataclasses.dataclass(frozen=True)
class Run(RunConfig):
  """A trained model ready to use (inside `activate()`): modules, weights, mesh and rules."""

  models: Models = None
  params: Any = None
  vae_params: Any = None
  mesh: jax.sharding.Mesh = None
  rules: Any = None

  @contextlib.contextmanager
  def activate(self) -> Iterator[Run]:
    """The run's mesh and sharding rules, which its jitted functions run under."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield self


def load(spec: RunConfig, devices: Sequence[jax.Device] | None = None) -> Run:
  """The run's latest checkpoint and its frozen VAE, verified against the run's record."""
  config, record, workdir = spec.config, spec.record, spec.workdir
  mesh = sharding.make_mesh(config.mesh, devices) if devices else sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, vae_params = inference.restore_params(config, workdir, models, mesh, rules)
  if record is not None:
    fingerprint = encode_latents.vae_fingerprint(models.vae, vae_params)
    if not check_vae(record, config, fingerprint, workdir):
      logging.warning(
        "run %s was made before runs recorded their VAE: using %s from its config, unverified",
        workdir,
        describe_vae(vae_identity(config, None)),
      )
    elif not config.init.vae_weights:
      logging.warning("run %s: its frozen VAE is %s, as in training", workdir,
                      describe_vae(record["vae"]))  # fmt: skip
  return Run(workdir, config, record, models, params, vae_params, mesh, rules)


def open_run(
  workdir: str,
  overrides: Sequence[str] = (),
  config: ml_collections.ConfigDict | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Run:
  """`resolve` then `load`: the run under `workdir`, ready to segment, generate, evaluate."""
  return load(resolve(workdir, overrides, config), devices)
