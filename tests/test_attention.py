"""The attention kernels behind `dot_product_attention` agree with the reference XLA kernel.

Splash attention (a Pallas TPU kernel) runs in Pallas interpret mode on CPU; cuDNN cannot run
here, so its test checks that the config routes the DiT's attention to it.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.models import wan_dit
from genmask_jax.models import attention
from genmask_jax.models.dit import WanDiT
from genmask_jax.runtime import sharding

# 128-wide tiles: the queries span two tiles, both sequences need padding.
SMALL_TILES = dict(attention.SPLASH_BLOCK_SIZES, **{k: 128 for k in attention.SPLASH_BLOCK_SIZES})


def qkv(b=4, lq=200, lk=77, heads=2, head_dim=64):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, lq, heads, head_dim))
  k = jax.random.normal(keys[1], (b, lk, heads, head_dim))
  v = jax.random.normal(keys[2], (b, lk, heads, head_dim))
  # Some keys, all keys, no key (a dropped text) and one key.
  mask = np.arange(lk)[None] < np.array([[40], [lk], [0], [1]])[:b]
  return q, k, v, mask


def test_kernels_agree_with_key_mask():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 5, 2, 8))
  k = jax.random.normal(keys[1], (2, 7, 2, 8))
  v = jax.random.normal(keys[2], (2, 7, 2, 8))
  mask = np.arange(7)[None] < np.array([[4], [7]])
  ref = attention.dot_product_attention(q, k, v, mask, impl="xla")
  np.testing.assert_allclose(
    attention.dot_product_attention(q, k, v, mask, impl="jax_xla"), ref, atol=1e-5
  )
  # Masked keys are ignored: dropping them gives the same result.
  np.testing.assert_allclose(
    attention.dot_product_attention(q[:1], k[:1, :4], v[:1, :4], impl="xla"), ref[:1], atol=1e-6
  )


def test_unknown_kernel_is_an_error():
  x = np.zeros((1, 1, 1, 4), np.float32)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    attention.dot_product_attention(x, x, x, impl="flash")


def test_splash_tiles_shrink_to_short_sequences():
  tiles = attention.splash_tiles(attention.SPLASH_BLOCK_SIZES, 2048, 77)
  assert tiles["block_q"] == tiles["block_q_dq"] == 512
  assert tiles["block_kv"] == tiles["block_kv_compute"] == tiles["block_kv_dkv"] == 128
  assert attention.splash_tiles(dict(block_q=512, block_kv_dq=None), 200, 600) == dict(
    block_q=256, block_kv_dq=None
  )


@pytest.mark.parametrize(
  "tiles, masked",
  [(None, True), (SMALL_TILES, True), (SMALL_TILES, False)],
  ids=["default-tiles", "128-tiles", "128-tiles-no-mask"],
)
def test_splash_matches_xla_values_and_grads(tiles, masked):
  """Padded, masked and unmasked sequences; forward and gradients, in interpret mode."""
  q, k, v, mask = qkv()
  key_mask = mask if masked else None
  weights = jax.random.normal(jax.random.key(1), q.shape)

  def loss(impl, q, k, v):
    out = attention.dot_product_attention(q, k, v, key_mask, impl=impl, block_sizes=tiles)
    return jnp.sum(out * weights), out

  grad_fn = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)
  (_, ref), ref_grads = grad_fn("xla", q, k, v)
  (_, out), grads = jax.jit(grad_fn, static_argnums=0)("splash", q, k, v)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for got, want in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))


def test_splash_bf16_close_to_xla():
  q, k, v, mask = (x.astype(jnp.bfloat16) if x.dtype != bool else x for x in qkv(b=2, lk=300))
  ref = attention.dot_product_attention(q, k, v, mask, impl="xla").astype(jnp.float32)
  out = attention.dot_product_attention(q, k, v, mask, impl="splash")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def test_splash_runs_per_shard_on_a_mesh():
  """Under a mesh (data 2, fsdp 2, tensor 2), splash runs on batch and head shards."""
  q, k, v, mask = qkv()
  ref = attention.dot_product_attention(q, k, v, mask, impl="xla")
  config = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(sharding.make_mesh(config)), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    out = jax.jit(lambda *a: attention.dot_product_attention(*a, impl="splash"))(q, k, v, mask)
  assert out.sharding.spec == jax.P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(out, ref, atol=1e-5)


def dit_forward(overrides, params=None):
  """(output, params) of the tiny DiT on condition tokens and a padded text."""
  cfg = wan_dit("tiny")
  cfg.update(use_text_mask=True, **overrides)
  model = WanDiT(**cfg.to_dict())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 1, 4, 6, 16)).astype(np.float32)
  cond = rng.standard_normal(x.shape).astype(np.float32)
  context = rng.standard_normal((2, 9, cfg.text_dim)).astype(np.float32)
  context_mask = np.arange(9)[None] < np.array([[5], [9]])
  t = np.array([900.0, 100.0], np.float32)
  if params is None:
    params = model.init(jax.random.key(0), x, t, context, context_mask, cond)["params"]
  return jax.jit(model.apply)({"params": params}, x, t, context, context_mask, cond), params


@functools.cache
def dit_reference():
  return dit_forward({})


def test_dit_config_selects_splash_with_its_tiles():
  ref, params = dit_reference()
  out, _ = dit_forward({"attention": "splash"}, params)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # The configured tiles reach the kernel: splash rejects a compute tile under 128 lanes.
  bad_tiles = dict(attention.SPLASH_BLOCK_SIZES, block_kv_compute=64)
  with pytest.raises(ValueError, match="bkv_compute=64 must be a multiple of 128"):
    dit_forward({"attention": "splash", "attention_block_sizes": bad_tiles}, params)


def test_dit_config_selects_cudnn(monkeypatch):
  """attention="cudnn" calls jax.nn.dot_product_attention(implementation="cudnn") for every
  attention of the block (run here with the XLA implementation, as cuDNN needs a GPU), with the
  text mask as the full (B, 1, Lq, Lk) bias that cuDNN accepts (it rejects a broadcast one)."""
  calls = []
  original = jax.nn.dot_product_attention

  def record(q, k, *args, implementation=None, mask=None, **kwargs):
    calls.append((implementation, "cross" if mask is not None else "self"))
    if mask is not None:
      assert mask.shape == (q.shape[0], 1, q.shape[1], k.shape[1])
    return original(q, k, *args, implementation="xla", mask=mask, **kwargs)

  ref, params = dit_reference()
  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  out, _ = dit_forward({"attention": "cudnn"}, params)
  assert set(calls) == {("cudnn", "self"), ("cudnn", "cross")}
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_splash_model_initializes_on_a_sharded_batch():
  """The train state of a splash DiT is created on 4 fake devices with the batch split over
  fsdp = 4 (the kernel is mapped over batch shards, so initialization needs a sample on each),
  with the same parameters as the reference kernel's."""
  from configs.genmask import get_config
  from genmask_jax.models.genmask import Models
  from genmask_jax.training import train
  from genmask_jax.training.optimizer import make_optimizer

  def state(kernel):
    config = get_config("tiny")
    config.dit.attention = kernel
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    models, optimizer = Models.from_config(config), make_optimizer(config.optimizer)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      return train.initial_train_state(models, config, optimizer, mesh, sharding.DEFAULT_RULES)

  splash, reference = state("splash"), state("xla")
  assert splash.params["dit"]["blocks"]["ffn_in"]["kernel"].sharding.spec[1] == "fsdp"
  jax.tree.map(np.testing.assert_array_equal, splash.params, reference.params)
