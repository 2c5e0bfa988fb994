r"""Trains or precomputes on a GPU cluster: writes an sbatch script, submits it, can follow its log.

  python -m launch.slurm_gpu --nodes=4 --gpus_per_node=8 --partition=gpu --account=my-account \
      --time=48:00:00 --venv=/shared/genmask-jax/.venv \
      --config=configs/genmask.py --workdir=/shared/runs/genmask1 \
      --config_overrides=total_steps=20000 --tail

  python -m launch.slurm_gpu --job=precompute_vlm --nodes=4 --gpus_per_node=8 --requeue ... -- \
      --samples=data/refcoco_unc/train --checkpoint=/models/Qwen2.5-VL-7B-Instruct \
      --out=features/refcoco_unc_train --dtype=bfloat16 --batch_size=16

The job runs one task per node (`srun`); each task is one JAX process driving all GPUs of its
node. `jax.distributed` is told explicitly who is who: the coordinator is the first host of
`scontrol show hostnames $SLURM_JOB_NODELIST` at --port, there are $SLURM_NTASKS (= --nodes)
processes, and this one is $SLURM_PROCID. The checkout (--repo_dir) and --workdir must be on a
file system every node sees. --dry_run prints the script and the sbatch command and runs none.

--job=precompute_vlm / precompute_latents submit a job array of --nodes independent tasks, each
one node with --gpus_per_node GPUs (with --gpus_per_node=1, one task per GPU, which Slurm may
pack onto shared nodes). Task k runs the entry point with the flags given after `--` plus
`--gpus=all --num_nodes=NODES --node_index=k` (launch/common/fanout.py): one worker per GPU, workers
k*G .. k*G+G-1 of NODES*G. Shards are resumable, so --requeue (or resubmitting) is safe.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

from absl import flags

from launch.common import commands, fanout

JOBS = ("train", "precompute_vlm", "precompute_latents")

# 0.9: XLA preallocates GPU memory (0.75 by default); leave the rest to NCCL and cuDNN.
# The latency hiding scheduler overlaps the FSDP all-gathers/reduce-scatters with compute.
DEFAULT_ENV = {
  "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",
  "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
}
# Expanded by each task's shell, not when the script is written.
_DISTRIBUTED_FLAGS = (
  '--coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$SLURM_NTASKS" '
  '--process_id="$SLURM_PROCID"'
)

# This launcher's own flags (not absl's global FLAGS): tests run main() again in one process,
# beside other launchers with flags of the same names.
FLAGS = flags.FlagValues()
define = commands.definers(FLAGS)
define.enum("job", "train", JOBS, "Train, or precompute as a job array.")
define.string("job_name", "genmask", "Slurm job name.")
define.integer("nodes", 1, "Nodes (train), or array tasks of one node each (precompute).")
define.integer("gpus_per_node", 8, "GPUs of each node (task).")
define.integer("cpus_per_task", None, "CPUs of each node's task (data loading).")
define.string("partition", None, "Slurm partition.")
define.string("account", None, "Slurm account.")
define.string("time", None, "Wall-clock limit, e.g. 48:00:00; default: the partition's.")
define.bool("requeue", help="Let Slurm requeue the job after preemption.")
define.multi("sbatch_arg", help="More #SBATCH lines, e.g. --qos=high.")
define.string("repo_dir", commands.PROJECT_ROOT, "Checkout on the shared file system.")
define.string("venv", None, "Virtual environment activated before srun.")
define.string("container_image", None, "Container for the tasks (pyxis srun --container-image).")
define.string("container_mounts", None, "pyxis --container-mounts, e.g. /shared:/shared.")
define.multi("prologue", help="Shell line run first, e.g. module load.")
define.string("python", "python", "Interpreter inside the job's environment.")
define.multi("env", help="NAME=VALUE exported (replaces a default).")
define.integer("port", 12355, "jax.distributed coordinator port.")
define.string("config", "configs/genmask.py", "Config file, relative to --repo_dir.")
define.string("workdir", None, "Training: shared folder (or gs://) for checkpoints and metrics.")
define.multi("config_overrides", help="KEY=VALUE config override.")
define.string("log_dir", "slurm_logs", "Folder of the job logs and the script.")
define.string("script", None, "Where to write the sbatch script; default: LOG_DIR/JOB_NAME.sbatch.")
define.bool("tail", help="Follow the job's log after submitting.")
define.bool("dry_run", help="Print the script and commands, run none.")


def log_path(log_dir: str, job_name: str, job_id: str) -> str:
  """The job's log; sbatch's --output spells them %x and %j (%A_%a: an array's task)."""
  return os.path.join(log_dir, f"{job_name}-{job_id}.out")


def is_array(args: commands.Flags) -> bool:
  return args.job != "train"


def precompute_command(args: commands.Flags) -> list[str]:
  """The entry point that every array task runs on its node (--node_index added by the task)."""
  return [
    args.python,
    "-m",
    f"launch.{args.job}",
    *args.entry_flags,
    "--gpus=all",
    f"--num_nodes={args.nodes}",
    f"--worker_logs={os.path.join(args.log_dir, args.job_name + '-workers')}",
  ]


def srun_command(args: commands.Flags) -> list[str]:
  if is_array(args):
    # Each array task is its own one-node job.
    nodes, task = 1, f'{shlex.join(precompute_command(args))} --node_index="$SLURM_ARRAY_TASK_ID"'
  else:
    train = commands.train_command(args.python, args.config, args.workdir, args.config_overrides)
    nodes, task = args.nodes, f"{shlex.join(train)} {_DISTRIBUTED_FLAGS}"
  step = [f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
  if args.cpus_per_task:  # srun no longer inherits it from sbatch (Slurm >= 22.05).
    step.append(f"--cpus-per-task={args.cpus_per_task}")
  if args.container_image:  # pyxis/enroot.
    step += [f"--container-image={args.container_image}", f"--container-workdir={args.repo_dir}"]
    step += [f"--container-mounts={args.container_mounts}"] if args.container_mounts else []
  return ["srun", *step, "bash", "-c", task]


def sbatch_script(args: commands.Flags) -> str:
  optional = {
    "time": args.time,
    "partition": args.partition,
    "account": args.account,
    "cpus-per-task": args.cpus_per_task,
  }
  array = is_array(args)
  directives = [
    f"--job-name={args.job_name}",
    *([f"--array=0-{args.nodes - 1}", "--nodes=1"] if array else [f"--nodes={args.nodes}"]),
    "--ntasks-per-node=1",
    f"--gpus-per-node={args.gpus_per_node}",
    *(f"--{key}={value}" for key, value in optional.items() if value),
    f"--output={log_path(args.log_dir, '%x', '%A_%a' if array else '%j')}",
    *(["--requeue"] if args.requeue else []),
    *args.sbatch_arg,
  ]
  env = dict(DEFAULT_ENV)
  env.update(commands.assignments(args.env, "--env", commands.ENV_NAME))
  venv = [f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}"] if args.venv else []
  lines = [
    "#!/bin/bash",
    *(f"#SBATCH {directive}" for directive in directives),
    "set -eo pipefail",
    shlex.join(["cd", args.repo_dir]),
    *args.prologue,
    *venv,
    *(shlex.join(["export", f"{key}={value}"]) for key, value in env.items()),
    *(_array_task_lines(args) if array else _coordinator_lines(args)),
    shlex.join(srun_command(args)),
  ]
  return "\n".join(lines) + "\n"


def _coordinator_lines(args: commands.Flags) -> list[str]:
  return [
    "# jax.distributed: the first node of the allocation coordinates.",
    'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
    'COORDINATOR="${NODES[0]}"',
    f'export COORDINATOR_ADDRESS="$COORDINATOR:{args.port}"',
  ]


def _array_task_lines(args: commands.Flags) -> list[str]:
  g, n = args.gpus_per_node, args.nodes
  return [f"# Task k of {n} runs workers k*{g} .. k*{g}+{g - 1} of {n * g}, one per GPU."]


def submit(shell: commands.Shell, args: commands.Flags) -> None:
  script = args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")
  shell.makedirs(args.log_dir)  # sbatch does not create the log's folder; the job would die.
  shell.write(script, sbatch_script(args))
  sbatch = ["sbatch", "--parsable", script]
  if shell.dry_run:
    shell.run(sbatch)
    if args.tail:
      task = "<job id>_<task>" if is_array(args) else "<job id>"
      shell.note(f"then: tail -n +1 -F {log_path(args.log_dir, args.job_name, task)}")
    return
  answer = shell.read(sbatch).strip()
  job_id = answer.split(";")[0]  # "<id>" or "<id>;<cluster>".
  if not job_id.isdigit():
    raise RuntimeError(f"sbatch answered {answer!r}, expected a job id")
  tasks = [f"{job_id}_{k}" for k in range(args.nodes)] if is_array(args) else [job_id]
  logs = [log_path(args.log_dir, args.job_name, task) for task in tasks]
  shell.note(f"submitted job {job_id}; log: {' '.join(logs)}")
  if args.tail:
    try:  # The logs appear when the tasks start; tail -F waits for them.
      shell.run(["tail", "-n", "+1", "-F", *logs])
    except KeyboardInterrupt:
      shell.note(f"stopped following the log; job {job_id} keeps running (scancel {job_id})")


def parse_flags(argv: Sequence[str] | None = None) -> commands.Flags:
  """The launcher's flags; for a precompute job, what follows `--` goes to the entry point."""
  argv = list(sys.argv[1:] if argv is None else argv)
  entry_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  rest = commands.parse(FLAGS, argv, __doc__)
  if rest:
    commands.usage_error(f"unexpected arguments {rest}; the entry point's flags go after --")
  args = commands.Flags(entry_flags=entry_flags, **FLAGS.flag_values_dict())
  if args.nodes < 1 or args.gpus_per_node < 1:
    commands.usage_error("--nodes and --gpus_per_node must be at least 1")
  if args.job == "train" and (entry_flags or not args.workdir):
    commands.usage_error("--job=train takes --workdir and --config_overrides, no flags after --")
  if is_array(args) and fanout.forwarded_argv(entry_flags) != entry_flags:
    commands.usage_error(f"the job array sets --{', --'.join(fanout.FANOUT_FLAGS)} itself")
  try:
    commands.train_command(args.python, args.config, args.workdir or "", args.config_overrides)
    commands.assignments(args.env, "--env", commands.ENV_NAME)
  except ValueError as e:
    commands.usage_error(str(e))
  # The job starts in the submission folder but cds to the checkout: pin paths down now.
  args.log_dir = os.path.abspath(args.log_dir)
  args.repo_dir = os.path.abspath(args.repo_dir)
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_flags(argv)
  submit(commands.Shell(args.dry_run), args)


if __name__ == "__main__":
  main()
