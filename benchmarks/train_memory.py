"""Per-device memory of the real sharded train step, from XLA's memory analysis (compile only).

  python -m benchmarks.train_memory --size=1.3b --resolution=512 --batch=8 --policies=none,full

Lowers and compiles, without running, `genmask_jax.training.train`'s jitted step (a segmentation
and a generation sub-batch, VAE encoding inside the step, AdamW) for abstract inputs on fake CPU
devices with FSDP (mesh data x fsdp, default 1 x 8), once per remat policy. Reports XLA's
per-device buffers: arguments (train state, VAE, batch), outputs, aliased (the donated state)
and temporaries (activations and scratch); peak ~ arguments + outputs - aliased + temporaries.
CPU buffer assignment is close to, not equal to, a GPU's or TPU's; the `xla` attention kernel
keeps the (L x L) probabilities that the flash kernels (cudnn, splash) never materialize.
"""

from __future__ import annotations

import os

# The fake devices must exist before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.genmask import get_config  # noqa: E402
from genmask_jax.fit import steps  # noqa: E402
from genmask_jax.models.genmask import Models  # noqa: E402
from genmask_jax.runtime import sharding  # noqa: E402
from genmask_jax.training import train  # noqa: E402
from genmask_jax.training.optimizer import make_optimizer  # noqa: E402

GIB = 2**30


def compile_step(config, batch: int, resolution: int):
  """(compiled step, seconds to lower and compile) for `config` with `batch` samples per task."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.get("sharding"))
  models, optimizer = Models.from_config(config), make_optimizer(config.optimizer)
  for task in ("segmentation", "generation"):
    config.data[task].resolution = resolution
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_shardings = train.abstract_train_state(models, config, optimizer, mesh, rules)
    vae, _ = sharding.abstract_with_shardings(models.abstract_vae_params(), mesh, rules)
    step = train.compile_train_step(models, config, optimizer, state_shardings, mesh)
    batches = steps.train_batch(config, mesh, {"segmentation": batch, "generation": batch})
    start = time.perf_counter()
    compiled = step.lower(state, vae, batches, steps.abstract_key(mesh)).compile()
  return compiled, time.perf_counter() - start


flags.DEFINE_string("size", "1.3b", "configs/genmask.py size")
flags.DEFINE_integer("resolution", 512, "Image side in pixels.")
flags.DEFINE_integer("batch", 8, "global batch per task")
flags.DEFINE_integer("data", 1, "mesh data axis; fsdp takes the rest")
flags.DEFINE_string("dtype", "bfloat16", "DiT compute dtype")
flags.DEFINE_string("policies", "none,full", "comma-separated remat policies")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS

  config = get_config(args.size)
  config.mesh = dict(data=args.data, fsdp=-1, tensor=1)
  config.dit.dtype = args.dtype
  n = jax.device_count()
  print(
    f"train step of {args.size}: {args.batch} segmentation + {args.batch} generation samples "
    f"at {args.resolution}x{args.resolution}, text {config.data.text_len} x "
    f"{config.dit.text_dim}, DiT in {args.dtype}, attention {config.dit.attention}; "
    f"{n} {jax.devices()[0].platform} devices, mesh data={args.data} fsdp={n // args.data}"
  )
  print(
    f"{'remat':>20} {'args GiB':>9} {'out GiB':>8} {'alias GiB':>9} {'temp GiB':>9} "
    f"{'peak GiB':>9} {'compile s':>10}"
  )
  for policy in args.policies.split(","):
    config.dit.remat_policy = policy
    compiled, seconds = compile_step(config, args.batch, args.resolution)
    m = compiled.memory_analysis()
    args_b, out_b, alias_b, temp_b = (
      m.argument_size_in_bytes,
      m.output_size_in_bytes,
      m.alias_size_in_bytes,
      m.temp_size_in_bytes,
    )
    peak = args_b + out_b - alias_b + temp_b
    print(
      f"{policy:>20} {args_b / GIB:>9.2f} {out_b / GIB:>8.2f} {alias_b / GIB:>9.2f} "
      f"{temp_b / GIB:>9.2f} {peak / GIB:>9.2f} {seconds:>10.0f}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
