r"""Entry point: training and evaluation.

  python -m genmask_jax.main --config=configs/genmask.py --workdir=runs/genmask \
      [--config.optimizer.lr=3e-5 ...] [--mode=train|eval]
  python -m genmask_jax.main --mode=eval --workdir=runs/genmask [--config.eval.splits=...]

Evaluation opens the run as `GenMask` does (genmask_jax/inference/genmask.py): its own config,
so --workdir is enough; --config and --config.x=y overrides apply on top, and a change to a
field that shapes the model is refused.

On a TPU pod or a SLURM allocation start the same command on every host; `jax.distributed`
is set up from the environment (or from --coordinator_address/--num_processes/--process_id).
Compiled programs are cached under WORKDIR/compile_cache (genmask_jax/runtime/compile_cache.py):
a restarted job loads them instead of compiling again.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from genmask_jax import GenMask, config_check
from genmask_jax.runtime import compile_cache, distributed, log_filter
from genmask_jax.training import preemption
from launch.common import run_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and results.", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
  overrides = run_flags.overrides_of(argv)
  if _MODE.value == "train" and _CONFIG.value is None:
    raise app.UsageError("--mode=train needs --config")
  log_filter.quiet_library_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cache = compile_cache.enable(_WORKDIR.value)
  logging.info("compilation cache: %s", cache)
  if _MODE.value == "train":
    from genmask_jax.training import train

    config_check.validate(_CONFIG.value, "train")
    preemption.install()  # Before the restore and the compilation, which can take minutes.
    train.train(_CONFIG.value, _WORKDIR.value)
  else:
    GenMask.open(_WORKDIR.value, overrides=overrides, config=_CONFIG.value).evaluate()


if __name__ == "__main__":
  app.run(main, flags_parser=run_flags.parse_flags)
