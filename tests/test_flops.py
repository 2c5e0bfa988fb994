"""The analytic FLOPs (genmask_jax/models/flops.py) agree with XLA's count on CPU."""

import functools

import jax
import jax.numpy as jnp
import pytest

from configs.models import wan_dit, wan_vae
from genmask_jax.models import flops
from genmask_jax.models.dit import REMAT_POLICIES, WanDiT
from genmask_jax.models.vae import WanVAE


def xla_flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def one_block(policy="none"):
  """(model, params, inputs) of a one-block mid DiT: 256 noisy + 256 condition tokens, text 64
  (XLA counts a scanned body once)."""
  cfg = wan_dit("mid")
  cfg.update(num_layers=1, remat_policy=policy, attention="xla")
  model = WanDiT(**cfg.to_dict())
  x, t, context = jnp.zeros((1, 1, 32, 32, 16)), jnp.zeros((1,)), jnp.zeros((1, 64, cfg.text_dim))
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, context, cond=x)["params"]
  return cfg, model, params, (x, t, context)


def test_dit_flops_match_xla_count():
  cfg, model, params, (x, t, context) = one_block()
  counted = xla_flops(lambda p: model.apply({"params": p}, x, t, context, cond=x), params)
  analytic = flops.dit_forward_flops(cfg, tokens=512, noisy=256, text=64)
  # XLA also counts the elementwise work (norms, softmax, GELU): about 1% here.
  assert 0.97 < analytic / counted < 1.0


@functools.cache
def gradient_flops(policy: str) -> float:
  _, model, params, (x, t, context) = one_block(policy)
  loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, context, cond=x) ** 2)
  return xla_flops(jax.grad(loss), params)


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_recompute_flops_match_xla_count(policy):
  """What a policy adds to the gradient's FLOPs is the analytic recompute, within 2% of the
  block's forward (XLA also recomputes elementwise work)."""
  cfg, *_ = one_block(policy)
  measured = gradient_flops(policy) - gradient_flops("none")
  analytic = flops.dit_recompute_flops(cfg, tokens=512, text=64, kernel="xla")
  forward = flops.dit_forward_flops(cfg, tokens=512, noisy=256, text=64)
  assert abs(measured - analytic) < 0.02 * forward


def test_vae_encode_flops_match_xla_count():
  cfg = wan_vae("small")
  model = WanVAE(**cfg.to_dict())
  images = jnp.zeros((1, 128, 128, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  counted = xla_flops(lambda p: model.apply({"params": p}, images, method=WanVAE.encode), params)
  # XLA skips the zero-padded border taps of 3x3 convs; the analytic count includes them.
  assert 1.0 < flops.vae_encode_flops(cfg, 128) / counted < 1.05


def test_vae_decode_flops_match_xla_count():
  cfg = wan_vae("small")
  model = WanVAE(**cfg.to_dict())
  latents = jnp.zeros((1, 16, 16, cfg.z_dim))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))["params"]
  counted = xla_flops(lambda p: model.apply({"params": p}, latents, method=WanVAE.decode), params)
  assert 1.0 < flops.vae_decode_flops(cfg, 128) / counted < 1.05
