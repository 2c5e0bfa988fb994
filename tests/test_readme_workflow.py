"""README.md's workflow, steps 1-6, run as printed with stand-in inputs, so that the README
cannot drift from the code.

The commands are the fenced bash blocks of the "## Workflow" section from "### 1." on, preceded
by the block of docs/trial.md, the trial the README links (the tiny Qwen2.5-VL, random diffusers
WAN weights). They run in order in a scratch folder, each through bash, with only the changes the
trial names (SUBSTITUTIONS); the test writes the other stand-ins where the commands read them.
Commands with no stand-in match exactly one rule of SKIPPED, and each rule must match a command.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import DEMO_ENV, shared_file
from PIL import Image

from configs.refcoco import get_config
from genmask_jax.data import store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIAL = "docs/trial.md"
REFCOCO_JSON = "fixtures/refcoco_tfds_dummy/refcoco.json"

# The trial's changes (docs/trial.md): (as printed, for the trial).
SUBSTITUTIONS = [
  (":1.3b", ":trial"),
  (":14b", ":trial"),
  ("Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors", "wan_trial/transformer"),
  ("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "wan_trial/vae/diffusion_pytorch_model.safetensors"),
  ("/models/Qwen2.5-VL-7B-Instruct", "tiny_qwen"),
  # The trial's batch of 2 does not split over a slice's chips: the compile check refuses it, and
  # launch.compile compiles it for one chip.
  ("launch.tpu_pod run", "launch.tpu_pod run --skip_compile_check"),
  ("launch.gke submit", "launch.gke submit --skip_compile_check"),
  ("--topology=v5p-64", "--topology=v5litepod-1"),
  ("--topology=v6e-64", "--topology=v6e-1"),
]
# Inputs the test writes, where the printed commands read them (docs/trial.md names each).
STAND_INS = (
  "manual/refcoco.json",
  "manual/coco_train2014/",
  "ReasonSeg/val/",
  "ReasonSeg/test/",
  "captions.jsonl",
  "street.jpg",
  "kitchen.jpg",
)
# Commands not run: why -> the commands it covers (a regex, over the whole command).
SKIPPED = {
  "no stand-in for ADE20K, COCO-Stuff or PASCAL-Part": (
    r"prepare_data (ade20k|cocostuff|pascal-part) |--samples=data/ade20k/"
  ),
  "needs a TPU pod or a SLURM cluster (their --dry_run commands run)": (
    r"^(?!.*--dry_run)(ssh-add |FLAGS=|nohup |python -m launch\.(tpu_pod|slurm_gpu) )"
  ),
}
# What the run commands must cover, so that a too broad rule cannot skip a step.
RUN_MODULES = {
  "launch.tiny_qwen",
  "launch.convert_wan",
  "launch.prepare_data",
  "launch.precompute_vlm",
  "launch.precompute_latents",
  "genmask_jax.main",
  "launch.predict",
  "launch.generate",
  "launch.tpu_pod",
  "launch.gke",
  "launch.slurm_gpu",
}


def commands(block: str) -> list[str]:
  """The commands of a bash block: backslash-continued lines joined, comment lines dropped."""
  out, current = [], []
  for line in block.splitlines():
    if not current and (not line.strip() or line.lstrip().startswith("#")):
      continue
    current.append(line)
    if not line.endswith("\\"):
      out.append("\n".join(current))
      current = []
  assert not current, f"a command ends in a backslash: {current}"
  return out


def bash_blocks(text: str) -> list[str]:
  return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def workflow() -> tuple[str, list[str], list[str]]:
  """(the trial's text, its commands, the commands of README.md's steps 1-6)."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(REPO, TRIAL)) as f:
    trial = f.read()
  section = re.split(r"\n## ", readme.split("\n## Workflow\n", 1)[1], maxsplit=1)[0]
  assert f"({TRIAL})" in section, f"the workflow does not link {TRIAL}"
  steps = section[section.index("\n### 1. ") :]
  assert re.findall(r"^### (\d)\. ", steps, re.M) == list("123456"), "steps 1-6"
  return trial, commands("\n".join(bash_blocks(trial))), commands("\n".join(bash_blocks(steps)))


def substitute(command: str) -> str:
  for printed, trial in SUBSTITUTIONS:
    command = command.replace(printed, trial)
  return command


def skip_reason(command: str) -> str | None:
  reasons = [why for why, rule in SKIPPED.items() if re.search(rule, command, re.S)]
  assert len(reasons) <= 1, f"{command}\nmatches several skip rules: {reasons}"
  return reasons[0] if reasons else None


def write_stand_ins(root: str, rng: np.random.Generator) -> dict:
  """TFDS's dummy refcoco.json with random JPEGs of its sizes, a ReasonSeg folder of val and
  test, text-image pairs and two photos; returns the refcoco.json data."""

  def jpeg(path: str, width: int, height: int) -> None:
    os.makedirs(os.path.dirname(os.path.join(root, path)) or root, exist_ok=True)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, path), quality=85)

  with open(shared_file(REFCOCO_JSON)) as f:
    refcoco = json.load(f)
  for entry in refcoco["coco_anns"].values():
    info = entry["info"]
    jpeg(f"manual/coco_train2014/{info['file_name']}", info["width"], info["height"])
  with open(os.path.join(root, "manual", "refcoco.json"), "w") as f:
    json.dump(refcoco, f)
  for split in ("val", "test"):
    for name, text, long in (("bowl", "the bowl", False), ("soup", "what holds hot soup?", True)):
      jpeg(f"ReasonSeg/{split}/{name}.jpg", 160, 120)
      polygon = [[20, 20], [120, 30], [90, 100]]
      ann = {"text": [text], "is_sentence": long, "shapes": [{"label": "t", "points": polygon}]}
      with open(os.path.join(root, "ReasonSeg", split, f"{name}.json"), "w") as f:
        json.dump(ann, f)
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    for i, caption in enumerate(("a red bus", "two cats on a sofa", "a tree")):
      jpeg(f"captions/{i}.jpg", 96, 64)
      f.write(json.dumps({"image": f"captions/{i}.jpg", "caption": caption}) + "\n")
  jpeg("street.jpg", 200, 150)
  jpeg("kitchen.jpg", 120, 90)
  return refcoco


def flags(command: str) -> dict[str, list[str]]:
  values: dict[str, list[str]] = {}
  for arg in shlex.split(command.replace("\\\n", " "), comments=True):
    name, _, value = arg.partition("=")
    if name.startswith("--"):
      values.setdefault(name[2:], []).append(value)
  return values


def image_size(path: str) -> tuple[int, int]:
  with Image.open(path) as image:
    return image.size


def module_of(command: str) -> str:
  """The `python -m` module a command runs, else the command."""
  match = re.search(r"python -m (\S+)", command)
  return match.group(1) if match else command


def check(command: str, output: str, root: str, refcoco: dict) -> None:
  """What each command must have written (its exit status is checked before)."""
  module = module_of(command)
  args = flags(command)
  at = lambda p: os.path.join(root, p)  # noqa: E731
  config = get_config("trial")
  if module == "launch.tiny_qwen":
    assert os.path.isfile(at(os.path.join(args["out"][0], "config.json")))
  elif "diffusers" in command:  # The trial's random WAN weights.
    for part in ("transformer", "vae"):
      assert os.path.isfile(at(f"wan_trial/{part}/diffusion_pytorch_model.safetensors"))
  elif module == "launch.convert_wan":
    assert os.path.isfile(at(os.path.join(args["out"][0], "conversion.json")))
  elif module == "launch.prepare_data":
    stores = os.listdir(at(args["output"][0]))
    assert stores and all(store.is_complete(at(f"{args['output'][0]}/{s}")) for s in stores)
  elif module == "launch.precompute_vlm":
    assert all(store.is_complete(at(out)) for out in args["out"][0].split(","))
  elif module == "launch.precompute_latents":
    sources = config.data.segmentation.sources + config.data.generation.sources
    assert all(store.is_complete(at(f"latents/{os.path.basename(s['features'])}")) for s in sources)
  elif module == "genmask_jax.main" and args.get("mode") == ["eval"]:
    with open(at(os.path.join(args["workdir"][0], "eval", "results.json"))) as f:
      results = json.load(f)
    splits = config.eval.splits
    expected = {s["name"] for s in splits}
    expected |= {f"{s['name']}/{q}" for s in splits if s["breakdown"] for q in ("short", "long")}
    assert set(results) == expected
    for split, scores in results.items():
      assert scores.pop("samples") > 0 and scores, split
      assert all(0 <= v <= 1 for v in scores.values()), (split, scores)
  elif module == "genmask_jax.main":
    with open(at(os.path.join(args["workdir"][0], "metrics.jsonl"))) as f:
      steps = [json.loads(line).get("step") for line in f]
    assert max(steps) == config.total_steps
  elif module == "launch.predict":
    sizes = [image_size(at(p)) for p in args.get("image", [])]
    names = [os.path.splitext(os.path.basename(p))[0] for p in args.get("image", [])]
    refs = {r["ann_id"]: refcoco["coco_anns"][str(r["image_id"])]["info"] for r in refcoco["ref"]}
    for sample_id in args.get("sample_id", []):
      info = refs[int(re.search(r"/ann(\d+)/", sample_id).group(1))]
      sizes.append((info["width"], info["height"]))
      names.append(os.path.basename(sample_id))
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
      mask = np.asarray(Image.open(at(f"{args['out'][0]}/{i:03d}_{name}_mask.png")))
      assert mask.shape == size[::-1] and set(np.unique(mask)) <= {0, 255}
      assert os.path.isfile(at(f"{args['out'][0]}/{i:03d}_{name}_overlay.png"))
  elif module == "launch.generate":
    side = int(args.get("resolution", [config.data.generation.resolution])[0])
    count, columns = len(args["prompt"]), int(args.get("columns", [4])[0])
    rows = -(-count // columns)
    assert image_size(at(args["out"][0])) == (min(count, columns) * side, rows * side)
  elif module == "launch.compile":
    searched = "--search" in command
    for step in ("train",) if searched else ("train", "segment", "generate", "vae_encode"):
      assert re.search(rf"^(.* )?{step} .* yes ", output, re.M), f"{step} does not fit:\n{output}"
    assert "choice: " in output or not searched
  elif module in ("launch.tpu_pod", "launch.slurm_gpu", "launch.gke"):
    assert "genmask_jax.main" in output or "launch.precompute" in output
  else:
    raise AssertionError(f"no check for {command}")


@pytest.mark.e2e
def test_readme_workflow_runs_as_printed(tmp_path):
  trial, setup, steps = workflow()
  prose = " ".join(trial.split())
  for printed, replacement in SUBSTITUTIONS:
    assert replacement in prose, f"docs/trial.md does not name {replacement}"
    assert any(printed in c for c in steps), f"no command of steps 1-6 holds {printed}"
  for path in STAND_INS:
    assert path in prose, f"docs/trial.md does not name {path}"

  root = str(tmp_path)
  os.symlink(os.path.join(REPO, "configs"), os.path.join(root, "configs"))
  refcoco = write_stand_ins(root, np.random.default_rng(0))
  env = dict(
    DEMO_ENV,  # One CPU device, as a user runs it.
    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    PYTHONPATH=REPO,
  )
  skipped, ran = [], set()
  for command in setup + [substitute(c) for c in steps]:
    reason = skip_reason(command)
    if reason:
      skipped.append(reason)
      print(f"skipped ({reason}): {command}")
      continue
    start = time.perf_counter()
    result = subprocess.run(
      ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    print(f"{time.perf_counter() - start:5.1f} s  {command}")
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    check(command, result.stdout + result.stderr, root, refcoco)
    ran.add(module_of(command))
  assert set(skipped) == set(SKIPPED), f"rules that match no command: {set(SKIPPED) - set(skipped)}"
  assert RUN_MODULES <= ran, f"steps not run: {RUN_MODULES - ran}"
