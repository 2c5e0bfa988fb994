"""One process of a multi-process training run on fake CPU devices (for test_train.py).

python tests/multiprocess_worker.py ROOT WORKDIR NUM_PROCESSES PROCESS_ID PORT [SLICES]

8 devices in all, mesh data=2 x fsdp=4: as one slice, or with SLICES=2 as one slice per process
(config.mesh data=1, fsdp=4, slices=2), data then running across the processes. Prints the
process of each device of the mesh, by data index.
"""

import sys

import jax
import train_config

from genmask_jax.runtime import distributed, sharding
from genmask_jax.training import train


def main(
  root: str, workdir: str, num_processes: int, process_id: int, port: int, slices: int = 1
) -> None:
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  config = train_config.get_config(root)
  config.total_steps = 4
  config.mesh = dict(data=2 // slices, fsdp=4, tensor=1, slices=slices)
  # The real pipeline: each process reads its half of the same global batches.
  config.data.segmentation.global_batch_size = config.data.generation.global_batch_size = 16
  mesh = sharding.make_mesh(config.mesh)
  print(
    "mesh processes by data index:",
    [sorted({d.process_index for d in row.flat}) for row in mesh.devices],
    flush=True,
  )
  train.train(config, workdir)


if __name__ == "__main__":
  main(*sys.argv[1:3], *map(int, sys.argv[3:]))
