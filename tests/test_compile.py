"""launch/compile: the trial config's steps compiled for real TPU slices on this CPU, through
libtpu's compile-only devices (the real TPU compiler, splash attention as Mosaic)."""

import functools
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.refcoco import get_config
from genmask_jax.config_check import ConfigError
from genmask_jax.fit import check, hlo, steps, targets
from genmask_jax.models import attention
from genmask_jax.models.genmask import Models
from genmask_jax.runtime import accelerators, sharding

GIB = 2**30
NOISE = re.compile(r"^(E0000|WARNING|===|learning/|Failed to find)")


def trial(batch: int):
  """The trial config (tiny DiT, 64 x 64 images) with `batch` samples per task and evaluation
  step (one per chip of the 4-chip slices below)."""
  config = get_config("trial")
  for task in ("segmentation", "generation"):
    config.data[task].global_batch_size = batch
  config.eval.batch_size = batch
  return config


@functools.cache
def train_report(accelerator: str, num_slices: int = 1):
  target = check.Target(accelerators.parse(accelerator), num_slices)
  (report,) = check.compile_for(trial(4 * num_slices), target, ("train",))
  return report


def test_accelerator_names():
  v5p = accelerators.parse("v5p-128")
  assert (v5p.chips, v5p.topology, v5p.hosts, v5p.chip_config) == (64, "v5p:4x4x4", 16, "megacore")
  v5e = accelerators.parse("v5litepod-16")
  assert (v5e.chips, v5e.topology, v5e.hosts, v5e.chip_config) == (16, "v5e:4x4", 4, "default")
  assert accelerators.parse("v5e-256").topology == "v5e:16x16"
  assert (accelerators.parse("v6e-8").hosts, accelerators.parse("v6e-32").topology) == (
    1,
    "v6e:4x8",
  )
  v4 = accelerators.parse("v4-32")
  assert (v4.chips, v4.topology, v4.hosts) == (16, "v4:2x2x4", 4)
  with pytest.raises(ValueError, match="v5p comes in sizes"):
    accelerators.parse("v5p-12")
  with pytest.raises(ValueError, match="expected FAMILY-COUNT"):
    accelerators.parse("h100-8")


@pytest.mark.parametrize(
  "name, hosts", [("v5litepod-1", 1), ("v6e-8", 1), ("v5p-8", 1), ("v5litepod-16", 4), ("v4-32", 4)]
)
def test_slices_have_their_hosts(name, hosts):
  """A single-host slice (one chip, a v6e's eight) is one process; larger ones 4 chips each."""
  devices = targets.tpu_devices(accelerators.parse(name))
  assert len(devices) == accelerators.parse(name).chips
  assert len({d.process_index for d in devices}) == hosts


@pytest.mark.parametrize("name", ["v4-8", "v5p-8", "v5litepod-4", "v6e-4"])
def test_usable_hbm_is_what_the_compiler_allows(name):
  """The table's HBM per chip is the TPU compiler's: a program needing 200 GiB of temporaries
  fails naming the HBM it has."""
  accelerator = accelerators.parse(name)
  devices = targets.tpu_devices(accelerator)
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  big = jax.ShapeDtypeStruct((200 * GIB // 4,), jnp.float32, sharding=replicated)
  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as error:
    jax.jit(lambda x: jnp.sum(jnp.sin(x) * x)).lower(big).compile()
  available = float(re.search(r"available HBM \(([\d.]+)G\)", str(error.value)).group(1))
  assert accelerator.hbm_bytes / GIB == pytest.approx(available, abs=0.01)


@pytest.mark.parametrize("accelerator", ["v5litepod-4", "v5p-8", "v6e-4"])
def test_train_step_compiles_with_mosaic_splash(accelerator):
  """The trial train step on a v5e, a v5p and a v6e slice: it fits, its splash attention is
  Mosaic (2 tasks x self / cross attention x forward, dq, dkv kernels; an interpreted kernel
  leaves none), and the per-chip inputs the report counts are what the compiler allocates."""
  report = train_report(accelerator)
  assert report.compiled and report.fits(), report.error
  assert report.mosaic_calls == 2 * 2 * 3
  assert report.flops > 0 and report.collectives["all-gather"] > 0


def expected_state_bytes(config, chips: int) -> int:
  """Per chip: the parameters and AdamW's two moments in fp32, those with an "embed" axis (FSDP's,
  by the default rules) split over the chips and the rest (norm scales, biases) whole on each,
  plus the step counts."""
  boxed = jax.eval_shape(lambda: Models.from_config(config).init_params(jax.random.key(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  elements = sum(
    int(np.prod(x.value.shape)) // (chips if "embed" in x.names else 1) for x in leaves
  )
  return 3 * 4 * elements + 3 * 4  # int32 counts: the train step, Adam's and the schedule's.


def test_reported_state_is_the_parameters_and_optimizer():
  report = train_report("v5p-8")
  assert report.inputs["state"] == expected_state_bytes(trial(4), 4)


@pytest.mark.parametrize("accelerator", ["v5litepod-4", "v5p-8"])
def test_two_slices_keep_one_slice_of_state_per_chip(accelerator):
  """Two v5e or v5p slices: data parallelism across them, FSDP within each, so that each chip
  holds what it holds on one slice, at twice the global batch, and sends the other slice only
  its shard of the gradients to sum (fp32; TPU tiles pad the toy model's small vectors)."""
  one, two = train_report(accelerator), train_report(accelerator, num_slices=2)
  assert two.compiled and two.fits(), two.error
  assert two.chips == 8 and two.inputs["state"] == one.inputs["state"]
  assert two.inputs["batch"] == one.inputs["batch"]
  assert one.cross_slice == {} and set(two.cross_slice) == {"ALL_REDUCE"}
  gradients = 4 * (one.inputs["state"] - 12) // 12  # The fp32 parameters' share of the state.
  assert gradients <= two.cross_slice["ALL_REDUCE"] <= 2 * gradients


def test_every_step_compiles_for_a_slice():
  target = check.Target(accelerators.parse("v5p-8"))
  reports = check.compile_for(
    trial(4), target, ("segment", "generate", "vae"), check.Batches(vae=4)
  )
  assert [r.step for r in reports] == ["segment", "generate", "vae_encode", "vae_decode"]
  for r in reports:
    assert r.compiled and r.fits(), (r.step, r.error)
  assert {r.step: r.mosaic_calls > 0 for r in reports} == {
    "segment": True,
    "generate": True,
    "vae_encode": False,
    "vae_decode": False,
  }


def test_the_sampler_gathers_the_weights_once_not_every_step():
  """Generation on a TPU slice with gather_weights: the DiT's weights cross the chips once per
  call (at most the whole fp32 DiT per chip), not in each of the trial's Euler steps, where the
  partitioner otherwise reduces partial activations (the v5p-8 trial: ~224 MB vs ~2 MB)."""
  target = check.Target(accelerators.parse("v5p-8"))
  moved = {}
  for gather in (False, True):
    config = trial(4)
    config.generate.gather_weights = gather
    (report,) = check.compile_for(config, target, ("generate",))
    assert report.compiled and report.fits(), report.error
    moved[gather] = report.collectives
  whole_dit = target.chips * report.inputs["state"]  # The state is the sharded DiT.
  assert sum(moved[True].values()) < 0.05 * sum(moved[False].values()), moved
  assert moved[True]["all-gather"] <= whole_dit, (moved, whole_dit)
  assert moved[True]["all-reduce"] + moved[True]["reduce-scatter"] < 0.01 * whole_dit, moved


def test_attention_follows_the_target_not_the_host():
  config = trial(4)
  target = check.Target(accelerators.parse("v5p-8"))
  assert check.kernel(config, target) == "splash"
  assert attention.resolve("auto", jnp.float32) == "xla"  # This CPU host, no mesh.
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  assert steps.kernel(config, mesh) == "xla"
  config.dit.attention = "cudnn"
  assert check.kernel(config, target) == "cudnn"  # Named kernels are kept.


# A compiled module as the TPU compiler prints it (shortened): a 5-iteration loop whose body
# gathers 2 x 1024 bf16 (4 KiB) asynchronously and reduces 256 floats (1 KiB) in a fusion that
# the compiler names for a reduce-scatter, then an all-reduce of 16 floats after the loop.
LOOP_HLO = """HloModule jit_step, entry_computation_layout={(f32[16]{0})->f32[16]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter.1 (input: f32[256]) -> f32[64] {
  %input = f32[256]{0} parameter(0)
  %all-reduce.7 = f32[256]{0:T(256)} all-reduce(%input), channel_id=3, to_apply=%add
  ROOT %slice = f32[64]{0} slice(%all-reduce.7), slice={[0:64]}
}

%body (p: (u32[], bf16[2,512])) -> (u32[], bf16[2,512]) {
  %p = (u32[], bf16[2,512]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %w = bf16[2,512]{1,0} get-tuple-element(%p), index=1
  %all-gather-start.2 = (bf16[2,512]{1,0}, bf16[2,1024]{1,0:T(2,128)(2,1)}, u32[]{:S(2)}) \
all-gather-start(%w), channel_id=1, dimensions={1}, metadata={op_name="jit(step)/while/body"}
  %all-gather-done.2 = bf16[2,1024]{1,0} all-gather-done(%all-gather-start.2)
  %f = f32[256]{0} convert(%all-gather-done.2)
  %rs = f32[64]{0} fusion(%f), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (u32[], bf16[2,512]) tuple(%i, %w)
}

%cond (q: (u32[], bf16[2,512])) -> pred[] {
  %limit = u32[]{:T(128)} constant(5), metadata={op_name="jit(step)/while/cond"}
  %q = (u32[], bf16[2,512]) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %limit), direction=LT, metadata={op_name="lt"}
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %init = (u32[], bf16[2,512]) tuple()
  %loop = (u32[], bf16[2,512]) while(%init), condition=%cond, body=%body
  ROOT %all-reduce.9 = f32[16]{0} all-reduce(%a), channel_id=2, to_apply=%add
}
"""


def test_collective_bytes_count_loop_iterations():
  assert hlo.execution_counts(LOOP_HLO)["body"] == 5
  assert hlo.execution_counts(LOOP_HLO)["all-reduce-scatter.1"] == 5
  counted = hlo.collective_bytes(LOOP_HLO)
  assert counted["all-gather"] == 5 * 2 * 1024 * 2
  assert counted["reduce-scatter"] == 5 * 256 * 4
  assert counted["all-reduce"] == 16 * 4


def run_compile(*args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "launch.compile", *args]
  return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_config_that_does_not_fit_exits_nonzero_naming_the_knobs():
  """The trial at 1024 x 1024 with 64 samples per chip: the VAE encoding in the step alone
  exceeds a v5e chip's 16 GB."""
  result = run_compile(
    "--config=configs/refcoco.py:trial",
    "--topology=v5litepod-4",
    "--steps=train",
    "--config.data.segmentation.resolution=1024",
    "--config.data.generation.resolution=1024",
    "--config.data.segmentation.global_batch_size=256",
    "--config.data.generation.global_batch_size=256",
  )
  assert result.returncode == 1
  message = "\n".join(line for line in result.stderr.splitlines() if not NOISE.match(line))
  assert "step train does not fit v5litepod-4" in message, message[-3000:]
  for knob in ("remat policy", "mesh split", "per-chip batch", "microbatches", "chips"):
    assert knob in message


def test_two_slices_mesh_runs_data_across_slices():
  """config.mesh is one slice's shape: data x slices spans the slices, each fsdp group stays in
  one; mesh.slices must match the target's slices."""
  config = trial(8)
  config.mesh.update(data=1, fsdp=4, tensor=1)
  target = check.Target(accelerators.parse("v5p-8"), num_slices=2)
  mesh = check.target_mesh(config, target)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert check.mesh_of(config, target) == dict(mesh.shape)
  for data_index in range(2):
    assert {d.slice_index for d in mesh.devices[data_index].flat} == {data_index}
  config.mesh.slices = 3
  with pytest.raises(ConfigError, match=r"mesh.slices is 3, but the devices span 2 TPU slice"):
    check.validate(config, target)


@pytest.mark.parametrize("accelerator", ["v6e-64", "v5p-64", "v5litepod-16"])
def test_fsdp_over_a_whole_slice_has_a_mesh(accelerator):
  """FSDP over every chip runs across both axes of a v6e's 8 x 8 torus (jax.make_mesh refuses
  that outside v5e)."""
  config = trial(4)
  devices = targets.tpu_devices(accelerators.parse(accelerator))
  mesh = sharding.make_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": len(devices), "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
