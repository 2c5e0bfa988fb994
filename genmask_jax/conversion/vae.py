"""WAN-2.1 VAE checkpoints (original `Wan2.1_VAE.pth` or diffusers layout) to `WanVAE` parameters.

Diffusers names are first mapped to the original WAN names (one function); then every leaf of
our parameter tree is taken from its original name with a strict shape check. Causal 3D convs
[O, I, kt, kh, kw] become 2D Flax kernels [kh, kw, I, O] from their last temporal tap, the only
tap that sees data for a single frame. The temporal resample convs (`time_conv`) never run for
one frame; they are set aside by name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from genmask_jax.conversion.tensor_files import (
  CheckpointError,
  TensorLedger,
  read_tensors,
  rename_keys,
)
from genmask_jax.models.vae import WanVAE

# WAN-2.1 downsamples in time after encoder stages 1 and 2; the decoder mirrors it.
_TEMPORAL_DOWN = (False, True, True)
_CONTAINER = {"encoder": "downsamples", "decoder": "upsamples"}
# Sub-modules of a residual block (ours and diffusers' names) -> the original `residual` slots.
_RESIDUAL = {
  "norm1": "residual.0",
  "conv1": "residual.2",
  "norm2": "residual.3",
  "conv2": "residual.6",
}
_TIME_CONV_REASON = "temporal resample conv: never runs for a single frame"


def _flat_index(side: str, stage: int, res: int | None, num_res_blocks: int) -> int:
  """Position in WAN's flat `downsamples` / `upsamples` list; res=None is the stage's resampler.

  Each encoder stage holds num_res_blocks residual blocks, each decoder stage one more; every
  stage but the last ends with a resampler.
  """
  per_stage = num_res_blocks + (1 if side == "encoder" else 2)
  return stage * per_stage + (per_stage - 1 if res is None else res)


def original_name(key: str, num_res_blocks: int) -> str:
  """A diffusers `AutoencoderKLWan` tensor name -> the original WAN name; others unchanged."""
  up = lambda stage, res: f"decoder.upsamples.{_flat_index('decoder', stage, res, num_res_blocks)}."
  rules = [
    (r"^quant_conv\.", lambda m: "conv1."),
    (r"^post_quant_conv\.", lambda m: "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", lambda m: f"{m[1]}.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", lambda m: f"{m[1]}.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", lambda m: f"{m[1]}.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", lambda m: f"{m[1]}.middle.2."),
    (r"^encoder\.down_blocks\.(\d+)\.", lambda m: f"encoder.downsamples.{m[1]}."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: up(int(m[1]), int(m[2]))),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(int(m[1]), None)),
  ]
  for pattern, replacement in rules:
    key, count = re.subn(pattern, replacement, key)
    if count:
      break
  # Residual-block parts, only directly under a numbered block (not the top-level conv1).
  names = "|".join([*_RESIDUAL, "conv_shortcut"])
  return re.sub(
    rf"^(\w+\.(?:middle|downsamples|upsamples)\.\d+)\.({names})\.",
    lambda m: f"{m[1]}.{_RESIDUAL.get(m[2], 'shortcut')}.",
    key,
  )


def _original_module(path: tuple[str, ...], num_res_blocks: int) -> tuple[str, bool]:
  """Our module path -> (its original WAN name, whether WAN runs it as a per-frame 2D module).

  E.g. ("encoder", "stage_1_res_0", "conv1") -> ("encoder.downsamples.3.residual.2", False).
  """
  if len(path) == 1:
    return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[path[0]], False
  side, part, *inner = path
  per_frame = "attn" in inner
  if part == "mid":
    part = "middle." + {"res_0": "0", "attn": "1", "res_1": "2"}[inner.pop(0)]
  elif m := re.fullmatch(r"stage_(\d+)_(?:res_(\d+)|down|up)", part):
    res = None if m[2] is None else int(m[2])
    part = f"{_CONTAINER[side]}.{_flat_index(side, int(m[1]), res, num_res_blocks)}"
    if res is None:  # The resampler's spatial conv, a Conv2d at index 1 of its Sequential.
      part, per_frame = part + ".resample.1", True
  else:
    part = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}[part]
  return ".".join([side, part, *(_RESIDUAL.get(name, name) for name in inner)]), per_frame


def _take_leaf(ledger: TensorLedger, module: str, per_frame: bool, leaf: str, shape) -> np.ndarray:
  """One Flax leaf (kernel, bias or gamma of `module`) from its PyTorch tensor."""
  if leaf == "kernel":
    kh, kw, cin, cout = shape
    if per_frame:
      weight = ledger.take(f"{module}.weight", (cout, cin, kh, kw))
    else:  # Causal Conv3d with a cubic kernel; keep the last temporal tap.
      weight = ledger.take(f"{module}.weight", (cout, cin, kh, kh, kw))[:, :, -1]
    return weight.transpose(2, 3, 1, 0)
  if leaf == "gamma":  # (C, 1, 1) for per-frame norms, (C, 1, 1, 1) for 3D ones.
    return ledger.take(f"{module}.gamma", (*shape, 1, 1, *(() if per_frame else (1,)))).reshape(
      shape
    )
  return ledger.take(f"{module}.{leaf}", shape)


def architecture_summary(tensors: Mapping[str, np.ndarray], cfg: Mapping) -> str:
  """The sizes a checkpoint's shapes show (original names) next to the config's."""
  blocks = {int(m[1]) for key in tensors if (m := re.match(r"encoder\.downsamples\.(\d+)\.", key))}

  def size(key: str, divisor: int = 1) -> str:
    return str(tensors[key].shape[0] // divisor) if key in tensors else "?"

  found = f"base_dim {size('encoder.conv1.weight')}, z_dim {size('conv1.weight', 2)}"
  expected_blocks = len(cfg["dim_mult"]) * (cfg["num_res_blocks"] + 1) - 1
  return (
    f"checkpoint: {found}, {len(blocks)} encoder blocks; config: base_dim {cfg['base_dim']}, "
    f"z_dim {cfg['z_dim']}, {expected_blocks} encoder blocks (dim_mult "
    f"{tuple(cfg['dim_mult'])}, num_res_blocks {cfg['num_res_blocks']})"
  )


def is_diffusers_layout(keys) -> bool:
  return "encoder.conv_in.weight" in keys


def vae_params_from_tensors(
  tensors: Mapping[str, np.ndarray], cfg: Mapping, source: str
) -> tuple[dict, dict[str, str]]:
  """Builds the `WanVAE` parameter tree from a state dict in either layout.

  `cfg` holds the `WanVAE` keyword arguments (`configs.models.wan_vae(size)`). Returns the
  parameters (numpy, fp32) and the set-aside keys with the reason for each. Raises
  CheckpointError listing every missing, unexpected or mis-shaped key.
  """
  cfg = dict(cfg)
  n = cfg["num_res_blocks"]
  if is_diffusers_layout(tensors):
    tensors = rename_keys(tensors, lambda k: original_name(k, n))
    source = f"{source} (diffusers layout; names below are the original WAN names)"
  elif "encoder.conv1.weight" not in tensors:
    raise CheckpointError(
      f"{source}: not a WAN VAE state dict (neither 'encoder.conv1.weight' nor "
      f"'encoder.conv_in.weight'); first keys: {sorted(tensors)[:5]}"
    )
  ledger = TensorLedger(tensors, source)

  abstract = jax.eval_shape(WanVAE(**cfg).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"])
  params = {}
  for path, value in flat.items():
    module, per_frame = _original_module(path[:-1], n)
    params[path] = np.asarray(_take_leaf(ledger, module, per_frame, path[-1], value.shape))

  for side, temporal in (("encoder", _TEMPORAL_DOWN), ("decoder", _TEMPORAL_DOWN[::-1])):
    kind = "down" if side == "encoder" else "up"
    for stage in (i for i, t in enumerate(temporal) if t):
      module, _ = _original_module((side, f"stage_{stage}_{kind}"), n)
      for leaf in ("weight", "bias"):
        ledger.set_aside_key(module.replace(".resample.1", f".time_conv.{leaf}"), _TIME_CONV_REASON)
  ledger.close(architecture_summary(tensors, cfg))
  logging.info("%s: %d tensors converted, %d set aside", source, len(params), len(ledger.set_aside))
  params = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  return traverse_util.unflatten_dict(params), ledger.set_aside


def convert_vae_file(path: str, cfg: Mapping) -> tuple[dict, dict[str, str]]:
  """Reads a WAN VAE checkpoint (`Wan2.1_VAE.pth`, or diffusers safetensors) and converts it."""
  return vae_params_from_tensors(read_tensors(path), cfg, source=path)
