"""Euler flow-matching sampler with WAN's shifted schedule and classifier-free guidance."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from genmask_jax.diffusion import flow, generate, guidance

B, H, W, C, S, D = 64, 4, 4, 16, 3, 8
COND = (1.5, 0.5)  # (mean, std) of the data the conditional field transports noise to.
UNCOND = (-0.5, 2.0)


def gaussian_velocity(x, t, mean, std):
  """E[eps - x0 | x_t = x] for x0 ~ N(mean, std^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps.

  (x0, eps, x_t) are jointly Gaussian with Var x_t = V = (1 - t)^2 std^2 + t^2,
  Cov(x0, x_t) = (1 - t) std^2 and Cov(eps, x_t) = t, so
  E[eps - x0 | x_t] = (t - (1 - t) std^2) / V * (x_t - (1 - t) mean) - mean.
  """
  var = (1 - t) ** 2 * std**2 + t**2
  return (t - (1 - t) * std**2) / var * (x - (1 - t) * mean) - mean


def gaussian_dit(params, x, t_dit, context, context_mask, cond):
  """Exact velocity fields: COND's for samples with text, UNCOND's for the null text."""
  del params, context, cond
  t = (t_dit / flow.DIT_TIME_SCALE)[:, None, None, None, None]
  has_text = jnp.any(context_mask, axis=1)[:, None, None, None, None]
  return jnp.where(has_text, gaussian_velocity(x, t, *COND), gaussian_velocity(x, t, *UNCOND))


def inputs(seed=0):
  k0, k1 = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(k0, (B, 1, H, W, C))
  context = jax.random.normal(k1, (B, S, D))
  return noise, context, jnp.ones((B, S), bool)


def sample(noise, context, context_mask, guidance_scale, num_steps=50, shift=5.0):
  run = functools.partial(
    generate.generate, gaussian_dit, {"dit": {}}, num_steps=num_steps, shift=shift
  )
  return jax.jit(run)(noise, context, context_mask, guidance_scale)


def test_schedule_matches_wan():
  # WAN-2.1's UniPC schedule at shift 5, 50 steps (`wan/utils/fm_solvers_unipc.py`).
  sigmas = generate.flow_sigmas(50, 5.0)
  assert sigmas.shape == (51,) and sigmas[-1] == 0.0
  np.testing.assert_allclose(sigmas[[0, -2]], [0.99980, 0.09251], atol=1e-5)
  dit_t = (sigmas[:-1] * 1000).astype(np.int64)
  assert list(dit_t[:4]) == [999, 995, 991, 987] and list(dit_t[-3:]) == [241, 172, 92]
  assert np.all(np.diff(sigmas) < 0)
  np.testing.assert_allclose(
    generate.flow_sigmas(10, 1.0)[:-1], np.linspace(0.999, 0, 11)[:-1], rtol=1e-6
  )


def test_euler_transports_noise_to_the_gaussian_data():
  noise, context, mask = inputs()
  # Euler's bias shrinks as 1 / steps; at 400 steps it is well inside the sampling error.
  x0 = np.asarray(sample(noise, context, mask, 1.0, num_steps=400, shift=3.0), np.float64)
  mean, std = COND
  n = x0.size
  # Moments within 4 standard errors.
  assert abs(x0.mean() - mean) < 4 * std / np.sqrt(n), x0.mean()
  assert abs(x0.var() - std**2) < 4 * std**2 * np.sqrt(2 / n), x0.var()
  # Sharper: the exact flow map of this field is x0 = mean + std * noise; Euler stays close.
  np.testing.assert_allclose(x0, mean + std * np.asarray(noise), atol=3e-2)


def test_guidance_scale_one_is_the_conditional_field():
  noise, context, mask = inputs(1)
  t_dit = jnp.full((B,), 700.0)
  v_guided = guidance.guided_velocity(gaussian_dit, {}, noise, t_dit, context, mask, 1.0)
  np.testing.assert_allclose(
    v_guided, gaussian_dit({}, noise, t_dit, context, mask, None), atol=1e-5
  )
  # The whole sampler at g = 1 equals a float64 Euler loop over the conditional field alone.
  x = np.asarray(noise, np.float64)
  sigmas = generate.flow_sigmas(20, 3.0).astype(np.float64)
  for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
    x = x + (sigma_next - sigma) * gaussian_velocity(x, sigma, *COND)
  np.testing.assert_allclose(sample(noise, context, mask, 1.0, 20, 3.0), x, atol=1e-4)


def test_guided_velocity_extrapolates_in_one_batched_forward():
  noise, context, mask = inputs(2)
  t_dit = jnp.full((B,), 400.0)
  calls = []

  def counting_dit(params, x, t_dit, context, context_mask, cond):
    calls.append(x.shape[0])
    return gaussian_dit(params, x, t_dit, context, context_mask, cond)

  v = guidance.guided_velocity(counting_dit, {}, noise, t_dit, context, mask, 3.0)
  assert calls == [2 * B]
  v_cond = gaussian_dit({}, noise, t_dit, context, mask, None)
  v_uncond = gaussian_dit({}, noise, t_dit, context, jnp.zeros_like(mask), None)
  np.testing.assert_allclose(v, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)


def test_sampler_runs_in_one_trace():
  traces = collections.Counter()

  def run(noise, context, context_mask, guidance_scale):
    traces["generate"] += 1
    return generate.generate(
      gaussian_dit,
      {"dit": {}},
      noise,
      context,
      context_mask,
      guidance_scale,
      num_steps=8,
      shift=5.0,
    )

  run = jax.jit(run)
  samples = [run(*inputs(0), scale) for scale in (1.0, 5.0)] + [run(*inputs(1), 5.0)]
  assert traces["generate"] == 1
  assert np.abs(samples[0] - samples[1]).max() > 0.1 and np.abs(samples[1] - samples[2]).max() > 0.1
