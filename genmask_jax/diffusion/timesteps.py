"""Training timestep distributions on [0, 1] (1 = pure noise), as inverse CDFs of uniforms.

Every distribution is a base distribution (logit-normal or uniform) followed by SD3's time
shift `t -> t / (t + s (1 - t))`, which multiplies the odds t / (1 - t) by 1 / s: s < 1 moves
mass to high noise, s = 1 leaves the base unchanged. This covers the paper's samplers:
  generation:   logit-normal (loc 0, scale 1), shift 1: `t = sigmoid(m + s * Phi^-1(u))`;
  segmentation: logit-normal, shift 0.05:               `t = sigmoid(Phi^-1(u) - ln s)`;
  alternative:  uniform, shift s (SD3's shifted uniform): `t = u / (u + s (1 - u))`.
For s = 0.05 the segmentation sampler puts ~10% of the mass below t = 0.85 and ~13% in its
heaviest 1%-wide bin, the figures the paper gives; the generation sampler peaks at ~1.6%.
Each sampler carries its analytic CDF and density for tests and plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.special import logit, ndtr, ndtri

Fn = Callable[[jax.Array], jax.Array]


class TimestepSampler(NamedTuple):
  """Elementwise functions: `icdf(u) -> t` draws, `cdf(t)` and `pdf(t)` describe the law."""

  icdf: Fn
  cdf: Fn
  pdf: Fn


def logit_normal(loc: float = 0.0, scale: float = 1.0) -> TimestepSampler:
  """t = sigmoid(loc + scale * z), z ~ N(0, 1)."""

  def pdf(t):
    z = (logit(t) - loc) / scale
    return jnp.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * scale * t * (1 - t))

  return TimestepSampler(
    icdf=lambda u: jax.nn.sigmoid(loc + scale * ndtri(u)),
    cdf=lambda t: ndtr((logit(t) - loc) / scale),
    pdf=pdf,
  )


def uniform() -> TimestepSampler:
  """t ~ U[0, 1]."""
  return TimestepSampler(
    icdf=lambda u: u,
    cdf=lambda t: jnp.clip(t, 0.0, 1.0),
    pdf=lambda t: jnp.where((t >= 0) & (t <= 1), 1.0, 0.0),
  )


def time_shift(t: jax.Array, shift: float) -> jax.Array:
  """SD3's time shift: multiplies the odds t / (1 - t) by 1 / shift."""
  return t / (t + shift * (1 - t))


def shifted(base: TimestepSampler, shift: float) -> TimestepSampler:
  """The law of `time_shift(t, shift)` for t drawn from `base`."""
  # time_shift(., 1 / shift) inverts time_shift(., shift); its derivative is the Jacobian below.
  return TimestepSampler(
    icdf=lambda u: time_shift(base.icdf(u), shift),
    cdf=lambda t: base.cdf(time_shift(t, 1 / shift)),
    pdf=lambda t: base.pdf(time_shift(t, 1 / shift)) * shift / (shift * t + 1 - t) ** 2,
  )


def timestep_sampler(config: ml_collections.ConfigDict) -> TimestepSampler:
  """Builds a sampler from `kind` (logit_normal | uniform), `shift` and, for logit_normal,
  `loc` and `scale`."""
  if config.kind == "logit_normal":
    base = logit_normal(config.get("loc", 0.0), config.get("scale", 1.0))
  elif config.kind == "uniform":
    base = uniform()
  else:
    raise ValueError(
      f"timestep sampler kind {config.kind!r} unknown; expected logit_normal or uniform"
    )
  shift = config.get("shift", 1.0)
  if not shift > 0:
    raise ValueError(f"timestep sampler shift must be > 0, got {shift}")
  return shifted(base, shift) if shift != 1.0 else base


def sample_timesteps(
  rng: jax.Array, task_ids: jax.Array, samplers: Sequence[TimestepSampler]
) -> jax.Array:
  """Draws one t per sample from the sampler of its task (`samplers[task_id]`).

  An out-of-range task id yields NaN, so a bad id shows up in the loss instead of borrowing
  another task's distribution.
  """
  u = jax.random.uniform(rng, task_ids.shape, jnp.float32)
  t = jnp.full(task_ids.shape, jnp.nan, jnp.float32)
  for task_id, sampler in enumerate(samplers):
    t = jnp.where(task_ids == task_id, sampler.icdf(u), t)
  return t
