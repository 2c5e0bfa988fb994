"""WanDiT parity with diffusers' WanTransformer3DModel through our converter (fp32, CPU)."""

import contextlib
import functools
import io
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from flax import linen as nn
from safetensors.numpy import save_file
from torch_reference import randomize_, state_dict_numpy

from configs.models import wan_dit
from genmask_jax.conversion.dit import (
  convert_dit_file,
  diffusers_kwargs,
  diffusers_to_original_name,
)
from genmask_jax.conversion.tensor_files import CheckpointError
from genmask_jax.models.dit import REMAT_POLICIES, WanDiT

TOL = 1e-4


def reference_model(cfg, seed=0):
  model = diffusers.WanTransformer3DModel(**diffusers_kwargs(cfg), rope_max_seq_len=64)
  return randomize_(model, seed).eval()


# WAN-2.1's own module names (Wan-Video/Wan2.1, wan/modules/model.py, `WanModel`) and the
# diffusers module each one became, written from WAN's module tree rather than from our
# converter, so that the original-layout parity tests do not rest on the table they test.
# Modules with a weight and a bias (Linear, Conv3d, affine LayerNorm):
_WAN_MODULES = {
  "patch_embedding": "patch_embedding",  # nn.Conv3d
  "text_embedding.0": "condition_embedder.text_embedder.linear_1",  # Linear, GELU, Linear
  "text_embedding.2": "condition_embedder.text_embedder.linear_2",
  "time_embedding.0": "condition_embedder.time_embedder.linear_1",  # Linear, SiLU, Linear
  "time_embedding.2": "condition_embedder.time_embedder.linear_2",
  "time_projection.1": "condition_embedder.time_proj",  # SiLU, Linear
  "head.head": "proj_out",  # Head: norm (no affine), head, modulation
}
# `WanAttentionBlock` (norm1 and norm2 have no parameters; norm3 is the cross-attention's affine
# LayerNorm, cross_attn_norm=True; q/k/v/o Linears, norm_q/norm_k WanRMSNorm with a weight only):
_WAN_BLOCK_MODULES = {
  **{f"self_attn.{n}": f"attn1.to_{n}" for n in "qkv"},
  "self_attn.o": "attn1.to_out.0",
  **{f"cross_attn.{n}": f"attn2.to_{n}" for n in "qkv"},
  "cross_attn.o": "attn2.to_out.0",
  "norm3": "norm2",
  "ffn.0": "ffn.net.0.proj",  # Linear, GELU, Linear
  "ffn.2": "ffn.net.2",
}
_WAN_BLOCK_RMS_NORMS = {
  f"{a}.{n}": f"{b}.{n}"
  for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
  for n in ("norm_q", "norm_k")
}


def wan_names(num_layers: int) -> dict[str, str]:
  """WAN name -> diffusers name of every tensor of a T2V `WanModel` with `num_layers` blocks."""
  names = {"head.modulation": "scale_shift_table"}  # nn.Parameter (1, 2, dim)
  for w, d in _WAN_MODULES.items():
    names.update({f"{w}.{p}": f"{d}.{p}" for p in ("weight", "bias")})
  for i in range(num_layers):
    names[f"blocks.{i}.modulation"] = f"blocks.{i}.scale_shift_table"  # nn.Parameter (1, 6, dim)
    for w, d in _WAN_BLOCK_MODULES.items():
      for p in ("weight", "bias"):
        names[f"blocks.{i}.{w}.{p}"] = f"blocks.{i}.{d}.{p}"
    for w, d in _WAN_BLOCK_RMS_NORMS.items():
      names[f"blocks.{i}.{w}.weight"] = f"blocks.{i}.{d}.weight"
  return names


def original_layout(state: dict, num_layers: int) -> dict:
  """A diffusers state dict under WAN's original names (every tensor named exactly once)."""
  names = wan_names(num_layers)
  assert sorted(names.values()) == sorted(state)
  return {wan: state[diffusers] for wan, diffusers in names.items()}


@functools.cache
def setup():
  cfg = wan_dit("tiny")
  ref = reference_model(cfg)
  return cfg, ref, state_dict_numpy(ref)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Our parameters converted from a diffusers file and from an original-layout file."""
  cfg, _, state = setup()
  folder = tmp_path_factory.mktemp("dit")
  diffusers_path = str(folder / "diffusion_pytorch_model.safetensors")
  save_file(state, diffusers_path)
  original_path = str(folder / "wan_original.safetensors")
  save_file(original_layout(state, cfg.num_layers), original_path)
  return {
    "diffusers": convert_dit_file(diffusers_path, cfg)[0],
    "original": convert_dit_file(original_path, cfg)[0],
  }


def run_reference(ref, x, t, context):
  """Diffusers on channels-last latents (B, F, H, W, C)."""
  with torch.no_grad():
    out = ref(
      hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))),
      timestep=torch.from_numpy(t),
      encoder_hidden_states=torch.from_numpy(context),
      return_dict=False,
    )[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


def run_ours(cfg, params, x, t, context, **kwargs):
  model = WanDiT(**{**cfg.to_dict(), **kwargs.pop("overrides", {})})
  return np.asarray(
    model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), **kwargs)
  )


def inputs(rng, b, f, h, w, s=7):
  cfg = setup()[0]
  x = rng.standard_normal((b, f, h, w, cfg.in_dim)).astype(np.float32)
  context = rng.standard_normal((b, s, cfg.text_dim)).astype(np.float32)
  return x, context


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize(
  "shape",
  [(2, 1, 8, 8), (2, 2, 6, 10)],
  ids=["batch2-square", "2frames-nonsquare"],
)
def test_parity_batch_timesteps(converted, layout, shape):
  cfg, ref, _ = setup()
  x, context = inputs(np.random.default_rng(0), *shape)
  t = np.array([999.0, 321.5], np.float32)
  expected = run_reference(ref, x, t, context)
  got = run_ours(cfg, converted[layout], x, t, context)
  assert np.abs(expected).max() > 0.3  # Outputs of order 1.
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_parity_per_token_timesteps(converted):
  cfg, ref, _ = setup()
  rng = np.random.default_rng(1)
  x, context = inputs(rng, 2, 1, 6, 8)
  t = rng.uniform(0, 1000, (2, 12)).astype(np.float32)
  np.testing.assert_allclose(
    run_ours(cfg, converted["original"], x, t, context),
    run_reference(ref, x, t, context),
    atol=TOL,
    rtol=0,
  )


@pytest.mark.parametrize("per_token", [False, True])
def test_parity_condition_tokens(converted, per_token):
  """N noisy + N condition tokens == the reference on [noisy frame, clean frame], t = 0 on clean."""
  cfg, ref, _ = setup()
  rng = np.random.default_rng(2)
  x, context = inputs(rng, 2, 1, 6, 8)
  cond = rng.standard_normal(x.shape).astype(np.float32)
  n = 12
  t = rng.uniform(0, 1000, (2, n) if per_token else (2,)).astype(np.float32)
  t_ref = np.concatenate(
    [np.broadcast_to(t.reshape(2, -1), (2, n)), np.zeros((2, n), np.float32)], 1
  )
  expected = run_reference(ref, np.concatenate([x, cond], axis=1), t_ref, context)[:, :1]
  got = run_ours(cfg, converted["diffusers"], x, t, context, cond=jnp.asarray(cond))
  assert got.shape == x.shape
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_text_mask(converted):
  """Masked padding equals the reference on the unpadded text; no mask equals zero padding."""
  cfg, ref, _ = setup()
  rng = np.random.default_rng(3)
  x, _ = inputs(rng, 2, 1, 4, 4)
  t = np.array([500.0, 20.0], np.float32)
  lengths = [3, 5]
  padded = np.zeros((2, 9, cfg.text_dim), np.float32)
  for i, n in enumerate(lengths):
    padded[i, :n] = rng.standard_normal((n, cfg.text_dim))
  mask = np.arange(9)[None] < np.array(lengths)[:, None]
  masked = run_ours(
    cfg,
    converted["diffusers"],
    x,
    t,
    padded,
    context_mask=jnp.asarray(mask),
    overrides={"use_text_mask": True},
  )
  for i, n in enumerate(lengths):
    expected = run_reference(ref, x[i : i + 1], t[i : i + 1], padded[i : i + 1, :n])
    np.testing.assert_allclose(masked[i : i + 1], expected, atol=TOL, rtol=0)
  unmasked = run_ours(cfg, converted["diffusers"], x, t, padded, context_mask=jnp.asarray(mask))
  np.testing.assert_allclose(unmasked, run_reference(ref, x, t, padded), atol=TOL, rtol=0)
  assert np.abs(unmasked - masked).max() > 1e-3  # The mask matters.


def test_tree_matches_init(converted):
  cfg = setup()[0]
  model = WanDiT(**cfg.to_dict())
  x, context = inputs(np.random.default_rng(0), 1, 1, 4, 4)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.ones((1,)), context)
  shapes = nn.unbox(shapes)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(converted["original"])
  jax.tree.map(
    lambda a, b: (a.shape == b.shape) or pytest.fail(f"{a.shape} != {b.shape}"),
    shapes,
    converted["original"],
  )


def test_logical_axes_on_every_parameter():
  cfg = wan_dit("tiny")
  model = WanDiT(**cfg.to_dict())
  x, context = inputs(np.random.default_rng(0), 1, 1, 4, 4)
  boxed = jax.eval_shape(model.init, jax.random.key(0), x, jnp.ones((1,)), context)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  blocks = jax.tree.leaves(
    boxed["blocks"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)
  )
  assert all(v.names[0] == "layers" and len(v.names) == v.value.ndim for v in blocks)


def test_sharded_index(tmp_path):
  """A `*.safetensors.index.json` with two shards converts like the single file."""
  cfg, _, state = setup()
  keys = sorted(state)
  shards = {
    "model-00001-of-00002.safetensors": keys[::2],
    "model-00002-of-00002.safetensors": keys[1::2],
  }
  weight_map = {}
  for name, shard_keys in shards.items():
    save_file({k: state[k] for k in shard_keys}, str(tmp_path / name))
    weight_map.update(dict.fromkeys(shard_keys, name))
  index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  single = tmp_path / "single"
  single.mkdir()
  save_file(state, str(single / "diffusion_pytorch_model.safetensors"))
  from_index, _ = convert_dit_file(str(tmp_path), cfg)
  from_file, _ = convert_dit_file(str(single), cfg)
  jax.tree.map(np.testing.assert_array_equal, from_index, from_file)


def _write(tmp_path, state):
  path = str(tmp_path / "bad.safetensors")
  save_file(state, path)
  return path


def test_converter_errors(tmp_path):
  cfg, _, state = setup()
  missing = {k: v for k, v in state.items() if k != "blocks.1.attn2.to_k.bias"}
  with pytest.raises(CheckpointError, match=r"missing keys \(1\).*blocks\.1\.cross_attn\.k\.bias"):
    convert_dit_file(_write(tmp_path, missing), cfg)
  extra = dict(state, **{"blocks.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected keys \(1\).*blocks\.0\.extra\.weight"):
    convert_dit_file(_write(tmp_path, extra), cfg)
  reshaped = dict(state, **{"proj_out.weight": np.zeros((3, cfg.dim), np.float32)})
  with pytest.raises(
    CheckpointError,
    match=r"mis-shaped keys \(1\).*head\.head\.weight: expected \(64, 64\), found \(3, 64\)",
  ):
    convert_dit_file(_write(tmp_path, reshaped), cfg)
  with pytest.raises(CheckpointError, match="no such file"):
    convert_dit_file(str(tmp_path / "absent.safetensors"), cfg)


def test_text_width_change_reinitializes_first_text_layer(tmp_path):
  cfg = wan_dit("tiny")
  wide = cfg.copy_and_resolve_references()
  wide.text_dim = 48
  state = state_dict_numpy(reference_model(wide))
  params, set_aside = convert_dit_file(_write(tmp_path, state), cfg)
  assert set(set_aside) == {"text_embedding.0.weight", "text_embedding.0.bias"}
  assert "re-initialized" in set_aside["text_embedding.0.weight"]
  assert params["text_embedding_1"]["kernel"].shape == (cfg.text_dim, cfg.dim)
  np.testing.assert_array_equal(
    params["text_embedding_2"]["kernel"],
    state["condition_embedder.text_embedder.linear_2.weight"].T,
  )


def test_wan_names_match_diffusers_own_converter():
  """The test's WAN names, fed to diffusers' original -> diffusers converter, give back the
  reference model's state dict: the table above agrees with a third party's reading of WAN."""
  cfg, _, state = setup()
  original = original_layout(state, cfg.num_layers)
  back = convert_wan_transformer_to_diffusers(dict(original))
  assert sorted(back) == sorted(state)
  for key, value in back.items():
    assert value is state[key], key


def test_converter_renames_every_diffusers_key_to_its_wan_name():
  """Our converter's table sends each diffusers name to WAN's name for the same tensor."""
  cfg, _, state = setup()
  expected = {d: w for w, d in wan_names(cfg.num_layers).items()}
  assert {k: diffusers_to_original_name(k) for k in state} == expected


@pytest.mark.parametrize("size, low, high", [("1.3b", 1.3e9, 1.45e9), ("14b", 14e9, 14.5e9)])
def test_parameter_count(size, low, high):
  """The full configs have exactly as many parameters as diffusers' models (built on meta)."""
  cfg = wan_dit(size)
  with torch.device("meta"):
    ref = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2),
      num_attention_heads=cfg.num_heads,
      attention_head_dim=cfg.dim // cfg.num_heads,
      in_channels=16,
      out_channels=16,
      text_dim=cfg.text_dim,
      freq_dim=256,
      ffn_dim=cfg.ffn_dim,
      num_layers=cfg.num_layers,
      eps=1e-6,
    )
  expected = sum(p.numel() for p in ref.parameters())
  model = WanDiT(**cfg.to_dict())
  shapes = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.zeros((1, 1, 4, 4, 16)),
    jnp.zeros((1,)),
    jnp.zeros((1, 8, cfg.text_dim)),
  )
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert ours == expected
  assert low < ours < high


def test_jit_bf16_runs_close_to_fp32(converted):
  cfg, _, _ = setup()
  x, context = inputs(np.random.default_rng(4), 2, 1, 8, 8)
  t = np.array([900.0, 100.0], np.float32)
  fp32 = run_ours(cfg, converted["diffusers"], x, t, context)
  bf16 = run_ours(cfg, converted["diffusers"], x, t, context, overrides={"dtype": "bfloat16"})
  assert bf16.dtype == np.float32
  rel = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
  print(f"bf16 vs fp32 relative max error: {rel:.2e}")
  assert 0 < rel < 0.1


@pytest.mark.parametrize(
  "overrides",
  [
    *({"remat_policy": p} for p in REMAT_POLICIES),
    {"scan_unroll": 2},  # The tiny DiT's two layers as straight-line code.
    {"scan_unroll": 2, "remat_policy": "full"},
  ],
)
def test_remat_and_unroll_same_loss_and_grads(converted, overrides):
  cfg, _, _ = setup()
  x, context = inputs(np.random.default_rng(5), 2, 1, 4, 4)
  t = jnp.array([700.0, 300.0])

  def loss(params, overrides):
    model = WanDiT(**{**cfg.to_dict(), **overrides})
    return jnp.mean(model.apply({"params": params}, x, t, context) ** 2)

  base = jax.value_and_grad(loss)(converted["diffusers"], {})
  other = jax.value_and_grad(loss)(converted["diffusers"], overrides)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), base, other)


@pytest.mark.parametrize("policy,keeps_attention", [("dots", False), ("dots_attention", True)])
def test_dots_attention_keeps_the_attention_output(policy, keeps_attention):
  """The attention output is tagged by name (every kernel: a cuDNN or splash call is no dot), so
  "dots_attention" keeps it for the backward pass; "dots" keeps the score matmuls instead."""
  cfg = setup()[0]
  x, context = inputs(np.random.default_rng(5), 2, 1, 4, 4)
  model = WanDiT(**{**cfg.to_dict(), "remat_policy": policy})
  params = model.init(jax.random.key(0), x, jnp.zeros(2), context)["params"]
  saved = io.StringIO()
  with contextlib.redirect_stdout(saved):
    jax.ad_checkpoint.print_saved_residuals(
      lambda p: jnp.mean(model.apply({"params": p}, x, jnp.zeros(2), context) ** 2), params
    )
  # Stacked over the layer scan: (layers, batch, noisy tokens, heads, head_dim) and the scores.
  layers, heads, tokens = cfg.num_layers, cfg.num_heads, 2 * 2  # 4 x 4 latents, 2 x 2 patches.
  attention_out = f"f32[{layers},2,{tokens},{heads},{cfg.dim // heads}]"
  scores = f"f32[{layers},2,{heads},{tokens},{tokens}]"
  assert (attention_out in saved.getvalue()) == keeps_attention, saved.getvalue()
  assert (scores in saved.getvalue()) != keeps_attention, saved.getvalue()
