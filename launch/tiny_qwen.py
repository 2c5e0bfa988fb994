r"""Builds a tiny random Qwen2.5-VL checkpoint directory (genmask_jax/vlm/tiny_qwen.py), the VLM
of the trial workflow and the tests: it loads like a real one, with nothing from the hub.

  python -m launch.tiny_qwen --out=tiny_qwen [--seed=0]
"""

from __future__ import annotations

from absl import app, flags

from genmask_jax.vlm.tiny_qwen import save_tiny_qwen

_OUT = flags.DEFINE_string("out", None, "Checkpoint directory to create.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")


def main(argv: list[str]) -> None:
  del argv
  print(save_tiny_qwen(_OUT.value, _SEED.value))


if __name__ == "__main__":
  app.run(main)
