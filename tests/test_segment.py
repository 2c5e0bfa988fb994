"""Segmentation in several Euler steps (config.segment.steps) against one step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_diffusion import linear_dit, linear_dit_params, make_batch, perfect_dit, segment_config

from genmask_jax.diffusion import flow, segment


def latents(velocity, batch, **config):
  return segment.one_step_latents(
    velocity,
    {"dit": {}},
    batch["cond"],
    batch["context"],
    batch["context_mask"],
    config=segment_config(**config),
  )


@pytest.mark.parametrize("steps", [2, 4])
def test_euler_steps_with_a_perfect_model_return_x0(steps):
  batch = make_batch()
  x0 = latents(perfect_dit(batch["latents"]), batch, t=0.9, steps=steps)
  np.testing.assert_allclose(x0, batch["latents"], atol=1e-5)


def test_steps_are_euler_steps_from_t_to_zero():
  batch = make_batch()
  params = linear_dit_params()
  velocity = lambda _, *args: linear_dit(params, *args)
  eps = jax.random.normal(jax.random.key(0), (1, *batch["cond"].shape[1:]))
  x, times = 0.8 * jnp.broadcast_to(eps, batch["cond"].shape), [0.8, 0.4, 0.0]
  for t, t_next in zip(times[:-1], times[1:], strict=True):
    t_dit = jnp.full((x.shape[0],), flow.dit_timesteps(t))
    v = velocity(None, x, t_dit, batch["context"], batch["context_mask"], batch["cond"])
    x = x + (t_next - t) * v
  got = latents(velocity, batch, t=0.8, steps=2)
  np.testing.assert_allclose(got, x, atol=1e-5)
  one = latents(velocity, batch, t=0.8, steps=1)
  assert np.abs(np.asarray(one) - np.asarray(got)).max() > 1e-3  # A stand-in with curvature.


def test_one_step_is_the_default_and_zero_steps_are_refused():
  batch = make_batch()
  params = linear_dit_params()
  velocity = lambda _, *args: linear_dit(params, *args)
  np.testing.assert_array_equal(latents(velocity, batch), latents(velocity, batch, steps=1))
  with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
    latents(velocity, batch, steps=0)
