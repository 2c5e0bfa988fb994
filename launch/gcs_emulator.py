r"""Serves a local GCS API server (genmask_jax/runtime/gcs_emulator.py) until Ctrl-C.

  python -m launch.gcs_emulator --bucket=my-bucket

Prints one `export` line per variable that points a storage client at it; paste them into the
shells that run the commands, then use gs://my-bucket/... paths.
"""

from __future__ import annotations

from absl import app, flags

from genmask_jax.runtime.gcs_emulator import Emulator

_BUCKET = flags.DEFINE_multi_string("bucket", [], "A bucket to create; repeatable.")


def main(argv: list[str]) -> None:
  del argv
  with Emulator() as gcs:
    for bucket in _BUCKET.value:
      gcs.create_bucket(bucket)
    print("\n".join(f"export {k}={v}" for k, v in gcs.env.items()), flush=True)
    try:
      gcs.process.wait()
    except KeyboardInterrupt:
      pass


if __name__ == "__main__":
  app.run(main)
