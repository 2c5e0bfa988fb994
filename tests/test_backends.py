"""With libtpu installed (requirements.txt), a CPU host starts no TPU backend: no libtpu warnings,
no libtpu lock held, and a TPU target can still be compiled for in the same process."""

import os
import subprocess
import sys

import pytest

# The tests' own environment names the platform; a user's shell does not.
ENV = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
ENV["PYTHONPATH"] = "."


def run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)


@pytest.mark.parametrize("imports", ["genmask_jax, jax", "jax, genmask_jax"])
def test_cpu_host_starts_no_tpu_backend_quietly(imports):
  """Whichever is imported first; the choice stays in this process (no JAX_PLATFORMS that a
  job submitted from here would inherit)."""
  code = (
    f"import os, {imports}\n"
    "print(jax.default_backend(), jax.device_count(), os.environ.get('JAX_PLATFORMS'))"
  )
  result = run(code)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["cpu", "1", "None"]
  assert result.stderr == ""


def test_a_tpu_target_compiles_beside_the_cpu_backend():
  code = (
    "import genmask_jax, jax, jax.numpy as jnp\n"
    "from genmask_jax.fit import targets\n"
    "from genmask_jax.runtime import accelerators\n"
    "jnp.ones(2).block_until_ready()\n"  # The CPU backend first, as in a test process.
    "devices = targets.tpu_devices(accelerators.parse('v5litepod-4'))\n"
    "print(jax.default_backend(), len(devices), devices[0].platform)\n"
  )
  result = run(code)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["cpu", "4", "tpu"]
