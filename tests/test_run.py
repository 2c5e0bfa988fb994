"""A run's config without a trained model (genmask_jax/runs/record.py,
launch/common/run_flags.py): the run's config read back from JSON, command-line overrides split
off and applied, model fields compared."""

import json

import ml_collections
import pytest

from configs.demo import get_config as demo_config
from genmask_jax.runs import record
from launch.common import run_flags


def json_round_trip(config: ml_collections.ConfigDict) -> dict:
  """What record.json holds: the config as JSON (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict()))


def test_config_from_run_json_equals_the_config_trained_with():
  config = demo_config()
  config.data.segmentation.sources = [{"records": "r", "features": "f", "weight": 2.0}]
  restored = record.config_from_dict(json_round_trip(config))
  assert restored.to_dict() == config.to_dict()
  # Model presets hold tuples (e.g. the DiT patch size); lists of dicts (sources) stay lists.
  assert isinstance(restored.dit.patch_size, tuple)
  assert isinstance(restored.data.segmentation.sources, list)
  assert restored.data.generation.sources == [] and restored.eval.splits == []
  assert record.model_field_changes(json_round_trip(config), restored.to_dict()) == []


@pytest.mark.parametrize(
  ("argv", "rest", "overrides"),
  [
    (  # Overrides leave argv; other flags and positionals keep their order.
      ["prog", "--workdir=w", "--config.dit.dtype=float32", "--out", "o", "--config.seed", "3"],
      ["prog", "--workdir=w", "--out", "o"],
      ["--config.dit.dtype=float32", "--config.seed=3"],
    ),
    (  # A bare boolean override does not take the next flag as its value.
      ["prog", "--config.data.segmentation.flip", "--workdir=w", "--noconfig.x"],
      ["prog", "--workdir=w"],
      ["--config.data.segmentation.flip", "--noconfig.x"],
    ),
    (  # With a --config file, ml_collections parses its overrides itself.
      ["prog", "--config=configs/demo.py", "--config.seed=3"],
      ["prog", "--config=configs/demo.py", "--config.seed=3"],
      [],
    ),
    (
      ["prog", "--config", "configs/demo.py", "--config.seed=3"],
      ["prog", "--config", "configs/demo.py", "--config.seed=3"],
      [],
    ),
  ],
)
def test_split_overrides(argv, rest, overrides):
  assert run_flags.split_overrides(argv) == (rest, overrides)


def test_apply_overrides_parses_values_like_config_flags_and_copies():
  config = demo_config()
  steps, dtype = config.total_steps, config.dit.dtype
  changed = record.apply_overrides(
    config, ["--config.total_steps=7", "--config.dit.dtype=bfloat16", "--config.eval.every_steps=0"]
  )
  assert (changed.total_steps, changed.dit.dtype, changed.eval.every_steps) == (7, "bfloat16", 0)
  assert (config.total_steps, config.dit.dtype) == (steps, dtype)  # The run's config is intact.
  with pytest.raises(Exception, match="total_steps"):
    record.apply_overrides(config, ["--config.total_steps=many"])
  with pytest.raises(Exception, match="no_such_field"):
    record.apply_overrides(config, ["--config.no_such_field=1"])
  # The Python API's form, `field=value`, is the same override.
  assert record.apply_overrides(config, ["total_steps=7"]).total_steps == 7


def test_model_fields_are_refused_by_name_and_execution_fields_are_free():
  config = demo_config()
  run_record = {"config": json_round_trip(config)}
  execution = record.apply_overrides(
    config,
    ["--config.dit.dtype=bfloat16", "--config.dit.attention=xla", "--config.eval.every_steps=9"],
  )
  record.check_config(run_record, execution, "runs/x")
  resized = record.apply_overrides(config, ["--config.dit.num_layers=3"])
  with pytest.raises(record.RunError, match=r"run runs/x: dit\.num_layers is 4 in the run, 3 here"):
    record.check_config(run_record, resized, "runs/x")
  text = record.apply_overrides(config, ["--config.data.text_len=8"])
  with pytest.raises(record.RunError, match=r"data\.text_len is \d+ in the run, 8 here"):
    record.check_config(run_record, text, "runs/x")


def test_a_field_the_run_did_not_record_is_not_compared():
  config = demo_config()
  recorded = json_round_trip(config)
  del recorded["dit"]["num_layers"]  # A run made before the field existed.
  changed = record.apply_overrides(config, ["--config.dit.num_layers=3"])
  assert record.model_field_changes(recorded, changed.to_dict()) == []


def test_overrides_of_refuses_stray_arguments():
  assert run_flags.overrides_of(["prog", "--config.seed=1"]) == ["--config.seed=1"]
  with pytest.raises(Exception, match="unexpected arguments: \\['stray'\\]"):
    run_flags.overrides_of(["prog", "stray"])
