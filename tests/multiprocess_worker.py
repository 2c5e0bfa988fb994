"""One process of a multi-process training run on fake CPU devices (for test_train.py).

python tests/multiprocess_worker.py ROOT WORKDIR NUM_PROCESSES PROCESS_ID PORT
"""

import sys

import jax
import train_config

from genmask_jax.runtime import distributed
from genmask_jax.training import train


def main(root: str, workdir: str, num_processes: int, process_id: int, port: int) -> None:
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  config = train_config.get_config(root)
  config.total_steps = 4
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  # The real pipeline: each process reads its half of the same global batches.
  config.data.segmentation.global_batch_size = config.data.generation.global_batch_size = 16
  train.train(config, workdir)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
