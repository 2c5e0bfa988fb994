"""Shared test set-up: CPU only, no network, deterministic torch."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for the tests and the processes they start (the trainer
# tests compile the same step in several processes).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "genmask_jax_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA:CPU's concurrency-optimized scheduler may start two independent all-gathers in different
# orders on different fake devices, and the in-process rendezvous then deadlocks (seen with FSDP
# over 8 devices training on stored latents, on the pinned jax). Processes with fake devices
# run it off.
IN_ORDER_COLLECTIVES = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def fake_devices(count: int) -> str:
  """XLA_FLAGS for `count` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={count} {IN_ORDER_COLLECTIVES}"


# Eight fake CPU devices for sharding tests.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fake_devices(8)).strip()

import torch  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags.
flags.FLAGS.mark_as_parsed()
torch.set_num_threads(2)


import pytest  # noqa: E402

SHARED_ENV = "GENMASK_SHARED"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """Keeps `xdist_group` tests on one worker under --dist=loadgroup. xdist 3.8 tags them by
  appending "@group" to `item._nodeid`, which pytest 9.2 no longer reads (a node's id is
  `item._id`), so the groups were silently ignored: session fixtures such as the shortened demo
  were built on every worker, and the multi-process tests ran beside it."""
  if not getattr(config.option, "loadgroup", False):  # Set on xdist workers only.
    return
  for item in items:
    groups = sorted(
      {
        str(m.args[0] if m.args else m.kwargs.get("name", "default"))
        for m in item.iter_markers("xdist_group")
      }
    )
    suffix = "@" + "_".join(groups)
    if groups and not item.nodeid.endswith(suffix):
      item._id = type(item._id).parse(item.nodeid + suffix)


def shared_file(relative: str) -> str:
  """A file of the project's shared/ folder: `$GENMASK_SHARED` if set, else `shared/` beside
  the checkout (CI clones the repository next to a copy of it). Absent, the test fails naming
  where it looked: a missing fixture is a broken set-up, not a reason to skip."""
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  root = os.environ.get(SHARED_ENV) or os.path.join(os.path.dirname(checkout), "shared")
  path = os.path.join(root, relative)
  if not os.path.isfile(path):
    where = f"${SHARED_ENV}={root}" if os.environ.get(SHARED_ENV) else f"{root} (beside the repo)"
    raise FileNotFoundError(
      f"test fixture {relative} not found under {where}: put the project's shared/ folder "
      f"beside the checkout or set {SHARED_ENV} to it"
    )
  return path


@pytest.fixture(scope="session")
def gcs():
  """A GCS API server on 127.0.0.1 (fake-gcs-server), with this process's storage clients
  pointed at it; `gcs.env` is the environment for subprocesses, `gcs.create_bucket(name)`."""
  from genmask_jax.runtime import gcs_emulator

  emulator = gcs_emulator.Emulator().start().stop_at_exit()
  gcs_emulator.apply(emulator.env)
  yield emulator


@pytest.fixture
def bucket(gcs, request):
  """A new bucket for one test: gs://NAME."""
  name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
  return gcs.create_bucket(name.strip("-") + f"-{os.getpid()}")


# The demo, shortened: 64 training scenes, each seen ~50 times: long enough to fit them, far too
# short to generalize (the full demo shows that).
SHORT_DEMO = [
  "--config.demo.num_train=64",
  "--config.demo.num_eval_train=64",
  "--config.demo.num_gen=200",
  "--config.demo.num_heldout=32",
  "--config.demo.num_generate=32",
  # A VAE that keeps most colours (round trip recall ~0.79; 600 steps at 2e-3 kept none), so the
  # generation measure can tell the trained model from the untrained one: ~50 s more.
  "--config.demo.vae_steps=2400",
  "--config.demo.vae_lr=5e-3",
  "--config.total_steps=400",
  "--config.checkpoint.every=200",
  "--config.log_every=50",
  "--config.generate.num_steps=8",
  # The generation timesteps the short model's figures (tests/test_demo.py, test_run_inference.py)
  # were measured with: the paper's unshifted sampler, not the full demo's shift 3.
  "--config.diffusion.timesteps.generation.shift=1.0",
]
# One CPU device and no glibc tunables (the demo sets its own), as a user runs it.
DEMO_ENV = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"XLA_FLAGS": ""}


def short_demo_command(workdir: str) -> list[str]:
  import sys

  return [sys.executable, "-m", "launch.demo", f"--workdir={workdir}", *SHORT_DEMO]


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory):
  """The shortened demo, run once per test process (its tests share the "heavy" xdist group):
  (work directory, the completed run)."""
  import subprocess

  workdir = str(tmp_path_factory.mktemp("short_demo") / "demo")
  result = subprocess.run(
    short_demo_command(workdir), env=DEMO_ENV, capture_output=True, text=True, timeout=1500
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result
