"""WAN-2.1 DiT checkpoints (original or diffusers layout) to `WanDiT` parameters.

Diffusers names are first mapped to the original WAN names (one table), then every tensor of
our tree is taken from its original name with a strict shape check. When the checkpoint's
text width (4096, umT5) differs from the config's (3584, Qwen2.5-VL), the first
text-embedding layer is set aside and freshly initialized.
"""

from __future__ import annotations

import logging
import re

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from genmask_jax.conversion.tensor_files import TensorLedger, read_tensors, rename_keys

# Diffusers name pattern -> original WAN name, applied in order (first match wins).
_DIFFUSERS_TO_ORIGINAL = [
  (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
  (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
  (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
  (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
  (r"^condition_embedder\.time_proj\.", "time_projection.1."),
  (r"^scale_shift_table$", "head.modulation"),
  (r"^proj_out\.", "head.head."),
  (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
  (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
  (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
  (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
  (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
  (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
  (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
  # Diffusers' norm2 is the cross-attention LayerNorm, the original's norm3.
  (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
  (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
  (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def diffusers_to_original_name(key: str) -> str:
  for pattern, replacement in _DIFFUSERS_TO_ORIGINAL:
    if re.match(pattern, key):
      return re.sub(pattern, replacement, key)
  return key


def diffusers_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """Arguments of diffusers' `WanTransformer3DModel` with the architecture of `cfg` (the
  PyTorch reference of the parity tests and benchmarks)."""
  return dict(
    patch_size=tuple(cfg.patch_size),
    num_attention_heads=cfg.num_heads,
    attention_head_dim=cfg.dim // cfg.num_heads,
    in_channels=cfg.in_dim,
    out_channels=cfg.out_dim,
    text_dim=cfg.text_dim,
    freq_dim=cfg.freq_dim,
    ffn_dim=cfg.ffn_dim,
    num_layers=cfg.num_layers,
    eps=cfg.eps,
  )


def is_diffusers_layout(keys) -> bool:
  return any(k.startswith(("condition_embedder.", "proj_out.")) for k in keys)


def architecture_summary(tensors: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> str:
  """The sizes a checkpoint's shapes show (original names) next to the config's; the head
  count shapes no tensor, so it cannot be read back."""
  layers = {int(m[1]) for key in tensors if (m := re.match(r"blocks\.(\d+)\.", key))}

  def size(key: str, axis: int) -> str:
    return str(tensors[key].shape[axis]) if key in tensors else "?"

  found = (
    f"num_layers {len(layers)}, dim {size('patch_embedding.weight', 0)}, ffn_dim "
    f"{size('blocks.0.ffn.0.weight', 0)}, text_dim {size('text_embedding.0.weight', 1)}"
  )
  expected = (
    f"num_layers {cfg.num_layers}, dim {cfg.dim}, ffn_dim {cfg.ffn_dim}, text_dim {cfg.text_dim}"
  )
  return f"checkpoint: {found}; config: {expected}"


def _linear(ledger: TensorLedger, name: str, in_dim: int, out_dim: int) -> dict[str, np.ndarray]:
  """PyTorch Linear `name` (weight [out, in]) as a Flax Dense {kernel [in, out], bias}."""
  return {
    "kernel": ledger.take(f"{name}.weight", (out_dim, in_dim)).T,
    "bias": ledger.take(f"{name}.bias", (out_dim,)),
  }


def _block(ledger: TensorLedger, i: int, cfg: ml_collections.ConfigDict) -> dict:
  d, p = cfg.dim, f"blocks.{i}"

  def attn(kind: str) -> dict:
    out = {n: _linear(ledger, f"{p}.{kind}.{n}", d, d) for n in "qkvo"}
    for n in ("norm_q", "norm_k"):
      out[n] = {"scale": ledger.take(f"{p}.{kind}.{n}.weight", (d,))}
    return out

  return {
    "modulation": ledger.take(f"{p}.modulation", (1, 6, d))[0],
    "self_attn": attn("self_attn"),
    "cross_attn": attn("cross_attn"),
    "norm3": {
      "scale": ledger.take(f"{p}.norm3.weight", (d,)),
      "bias": ledger.take(f"{p}.norm3.bias", (d,)),
    },
    "ffn_in": _linear(ledger, f"{p}.ffn.0", d, cfg.ffn_dim),
    "ffn_out": _linear(ledger, f"{p}.ffn.2", cfg.ffn_dim, d),
  }


def _text_embedding_1(ledger: TensorLedger, cfg: ml_collections.ConfigDict, seed: int) -> dict:
  """The first text layer; re-initialized (as the model initializes it) on a width change."""
  shape = ledger.shape("text_embedding.0.weight")
  if shape is None or shape[1] == cfg.text_dim:
    return _linear(ledger, "text_embedding.0", cfg.text_dim, cfg.dim)
  reason = f"text width {shape[1]} in the checkpoint, {cfg.text_dim} in the config: re-initialized"
  logging.warning("text_embedding.0: %s", reason)
  for key in ("text_embedding.0.weight", "text_embedding.0.bias"):
    ledger.set_aside_key(key, reason)
  kernel = nn.initializers.xavier_uniform()(jax.random.key(seed), (cfg.text_dim, cfg.dim))
  return {"kernel": np.asarray(kernel), "bias": np.zeros((cfg.dim,), np.float32)}


def dit_params_from_tensors(
  tensors: dict[str, np.ndarray], cfg: ml_collections.ConfigDict, source: str, seed: int = 0
) -> tuple[dict, dict[str, str]]:
  """Builds the `WanDiT` parameter tree from a state dict in either layout.

  Returns the parameters (numpy, fp32) and the set-aside keys with the reason for each.
  Raises CheckpointError listing every missing, unexpected or mis-shaped key.
  """
  if is_diffusers_layout(tensors):
    tensors = rename_keys(tensors, diffusers_to_original_name)
  ledger = TensorLedger(tensors, source)
  d, c = cfg.dim, cfg.in_dim
  pt, ph, pw = cfg.patch_size
  n_patch = pt * ph * pw

  patch_weight = ledger.take("patch_embedding.weight", (d, c, pt, ph, pw))
  blocks = [_block(ledger, i, cfg) for i in range(cfg.num_layers)]
  params = {
    # Conv3d with kernel = stride = patch is a Dense over (pt, ph, pw, c)-ordered patches.
    "patch_embedding": {
      "kernel": patch_weight.transpose(2, 3, 4, 1, 0).reshape(n_patch * c, d),
      "bias": ledger.take("patch_embedding.bias", (d,)),
    },
    "time_embedding_1": _linear(ledger, "time_embedding.0", cfg.freq_dim, d),
    "time_embedding_2": _linear(ledger, "time_embedding.2", d, d),
    "time_projection": _linear(ledger, "time_projection.1", d, 6 * d),
    "text_embedding_1": _text_embedding_1(ledger, cfg, seed),
    "text_embedding_2": _linear(ledger, "text_embedding.2", d, d),
    "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks),
    "head_modulation": ledger.take("head.modulation", (1, 2, d))[0],
    "head": _linear(ledger, "head.head", d, n_patch * cfg.out_dim),
  }
  ledger.close(architecture_summary(tensors, cfg))
  params = jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), params)
  return params, ledger.set_aside


def convert_dit_file(path: str, cfg: ml_collections.ConfigDict, seed: int = 0) -> tuple[dict, dict]:
  """Reads a DiT checkpoint (file, sharded index or folder) and converts it."""
  return dit_params_from_tensors(read_tensors(path), cfg, source=path, seed=seed)
