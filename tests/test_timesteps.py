"""Timestep samplers: the paper's figures, KS tests against their own CDFs, densities."""

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genmask_jax.data import tasks
from genmask_jax.diffusion import timesteps

N_DRAWS = 10**6
KS_CRITICAL_5PCT = 1.36 / np.sqrt(N_DRAWS)

SEGMENTATION = dict(kind="logit_normal", loc=0.0, scale=1.0, shift=0.05)
GENERATION = dict(kind="logit_normal", loc=0.0, scale=1.0, shift=1.0)
CANDIDATES = {
  "generation": GENERATION,
  "segmentation": SEGMENTATION,
  "segmentation_s0.1": dict(SEGMENTATION, shift=0.1),
  "shifted_uniform": dict(kind="uniform", shift=0.05),
  "uniform": dict(kind="uniform", shift=1.0),
  "logit_normal_loc_scale": dict(kind="logit_normal", loc=0.5, scale=0.7, shift=0.3),
}


def sampler(**kwargs) -> timesteps.TimestepSampler:
  return timesteps.timestep_sampler(ml_collections.ConfigDict(kwargs))


def draws(config: dict, n: int = N_DRAWS, seed: int = 0) -> np.ndarray:
  u = jax.random.uniform(jax.random.key(seed), (n,))
  return np.asarray(jax.jit(sampler(**config).icdf)(u), np.float64)


def heaviest_percent_bin(t: np.ndarray) -> float:
  counts, _ = np.histogram(t, bins=100, range=(0.0, 1.0))
  return counts.max() / t.size


def ks_statistic(t: np.ndarray, cdf) -> float:
  """sup |F_n - F| of the empirical CDF of t against cdf."""
  t = np.sort(t)
  f = np.asarray(cdf(jnp.asarray(t, jnp.float32)), np.float64)
  n = t.size
  return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def test_segmentation_sampler_matches_paper_figures():
  t = draws(SEGMENTATION)
  below = np.mean(t < 0.85)
  assert 0.09 <= below <= 0.115, below
  assert 0.12 <= heaviest_percent_bin(t) <= 0.14, heaviest_percent_bin(t)


def test_generation_sampler_peak():
  t = draws(GENERATION)
  assert 0.014 <= heaviest_percent_bin(t) <= 0.018, heaviest_percent_bin(t)
  assert abs(np.median(t) - 0.5) < 0.005


def test_closed_forms_from_the_brief():
  u = jnp.linspace(0.001, 0.999, 501)
  z = jax.scipy.special.ndtri(u)
  np.testing.assert_allclose(
    sampler(**SEGMENTATION).icdf(u), jax.nn.sigmoid(z - np.log(0.05)), rtol=1e-5
  )
  np.testing.assert_allclose(sampler(**GENERATION).icdf(u), jax.nn.sigmoid(z), rtol=1e-5)
  np.testing.assert_allclose(
    sampler(kind="uniform", shift=0.05).icdf(u), u / (u + 0.05 * (1 - u)), rtol=1e-5
  )


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_kolmogorov_smirnov_against_own_cdf(name):
  config = CANDIDATES[name]
  statistic = ks_statistic(draws(config, seed=1), sampler(**config).cdf)
  assert statistic < KS_CRITICAL_5PCT, (name, statistic, KS_CRITICAL_5PCT)


def test_kolmogorov_smirnov_rejects_the_other_task():
  # The statistic has power: segmentation draws are far from the generation law.
  statistic = ks_statistic(draws(SEGMENTATION, n=10**4), sampler(**GENERATION).cdf)
  assert statistic > 0.5


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_density_integrates_to_cdf(name):
  law = sampler(**CANDIDATES[name])
  grid = np.linspace(1e-6, 1 - 1e-6, 200_001)
  density = np.asarray(law.pdf(jnp.asarray(grid, jnp.float32)), np.float64)
  integral = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
  cdf = np.asarray(law.cdf(jnp.asarray(grid, jnp.float32)), np.float64)
  np.testing.assert_allclose(integral + cdf[0], cdf, atol=2e-4)
  assert abs(integral[-1] + cdf[0] - 1.0) < 2e-4


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_icdf_inverts_cdf(name):
  law = sampler(**CANDIDATES[name])
  u = jnp.linspace(0.01, 0.99, 99)
  np.testing.assert_allclose(law.cdf(law.icdf(u)), u, atol=2e-5)


def test_smaller_shift_puts_more_mass_at_high_noise():
  shifts = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02]
  high_noise = [1 - float(sampler(**dict(SEGMENTATION, shift=s)).cdf(0.85)) for s in shifts]
  means = [draws(dict(SEGMENTATION, shift=s), n=10**5).mean() for s in shifts]
  assert np.all(np.diff(high_noise) > 0), high_noise
  assert np.all(np.diff(means) > 0), means


def test_mixed_batch_draws_from_each_tasks_sampler():
  config = ml_collections.ConfigDict
  samplers = (
    timesteps.timestep_sampler(config(SEGMENTATION)),
    timesteps.timestep_sampler(config(GENERATION)),
  )
  task_ids = jnp.arange(100_000) % 2
  rng = jax.random.key(3)
  t = np.asarray(jax.jit(timesteps.sample_timesteps, static_argnums=2)(rng, task_ids, samplers))
  # Same uniforms, each through its own task's inverse CDF.
  u = jax.random.uniform(rng, task_ids.shape)
  is_seg = np.asarray(task_ids == tasks.SEGMENTATION)
  np.testing.assert_allclose(t[is_seg], samplers[0].icdf(u)[is_seg], rtol=1e-6)
  np.testing.assert_allclose(t[~is_seg], samplers[1].icdf(u)[~is_seg], rtol=1e-6)
  assert abs(np.mean(t[is_seg] < 0.85) - 0.1036) < 0.005
  assert abs(np.mean(t[~is_seg] < 0.85) - 0.9586) < 0.005
  bad = timesteps.sample_timesteps(rng, jnp.array([0, 1, 2, -1]), samplers)
  assert np.isfinite(bad[:2]).all() and np.isnan(bad[2:]).all()


def test_samplers_vmap_and_jit_without_retracing():
  law = sampler(**SEGMENTATION)
  u = jax.random.uniform(jax.random.key(4), (8, 16))
  np.testing.assert_allclose(jax.vmap(law.icdf)(u), law.icdf(u), rtol=1e-6)
  traces = collections.Counter()

  def draw(rng, task_ids):
    traces["draw"] += 1
    return timesteps.sample_timesteps(rng, task_ids, [law, sampler(**GENERATION)])

  draw = jax.jit(draw)
  for seed in range(3):
    draw(jax.random.key(seed), jnp.array([0, 1, 1, 0])).block_until_ready()
  assert traces["draw"] == 1


def test_factory_rejects_bad_configs():
  with pytest.raises(ValueError, match="kind 'beta' unknown"):
    sampler(kind="beta", shift=1.0)
  with pytest.raises(ValueError, match="shift must be > 0"):
    sampler(kind="uniform", shift=0.0)
