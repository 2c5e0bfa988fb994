"""Rectified flow, text dropout, the three segmentation losses and one-step segmentation,
with stand-in models (a linear "DiT", a fixed random linear "VAE decoder")."""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genmask_jax.data import tasks
from genmask_jax.diffusion import flow, guidance, losses, mask_decoders, segment

B, H, W, C, S, D = 4, 2, 3, 16, 5, 8  # Latent grid 2 x 3 -> masks 16 x 24.


def loss_config(segmentation_loss="mse", text_dropout=0.0):
  return ml_collections.ConfigDict(
    dict(
      timesteps=dict(
        segmentation=dict(kind="logit_normal", loc=0.0, scale=1.0, shift=0.05),
        generation=dict(kind="logit_normal", loc=0.0, scale=1.0, shift=1.0),
      ),
      segmentation_loss=segmentation_loss,
      text_dropout=text_dropout,
    )
  )


def segment_config(**overrides):
  return ml_collections.ConfigDict(
    dict(dict(t=1.0, noise="gaussian", seed=0, decoder="vae"), **overrides)
  )


def linear_dit(params, x, t_dit, context, context_mask, cond):
  """A stand-in DiT: linear in x, cond and the masked mean text feature, plus a time term."""
  text = jnp.sum(context * context_mask[..., None], axis=1) / jnp.maximum(
    jnp.sum(context_mask, axis=1, keepdims=True), 1
  )
  t = (t_dit / flow.DIT_TIME_SCALE)[:, None, None, None, None]
  return (
    x @ params["w_x"]
    + cond @ params["w_cond"]
    + (text @ params["w_text"])[:, None, None, None]
    + t * params["b"]
  )


def linear_dit_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
    "w_x": 0.3 * jax.random.normal(k[0], (C, C)),
    "w_cond": 0.3 * jax.random.normal(k[1], (C, C)),
    "w_text": 0.3 * jax.random.normal(k[2], (D, C)),
    "b": 0.3 * jax.random.normal(k[3], (C,)),
  }


def perfect_dit(x0):
  """Knows the clean latents: returns the exact velocity (x_t - x0) / t for any input."""

  def velocity(params, x, t_dit, context, context_mask, cond):
    del params, context, context_mask, cond
    return (x - x0) / (t_dit / flow.DIT_TIME_SCALE)[:, None, None, None, None]

  return velocity


def vae_mask_logits(vae_params, latents):
  """Stand-in frozen decoder: linear 16 -> 8 x 8 x 3 pixels, tanh to [-1, 1], channel mean."""
  b, h, w, _ = latents.shape
  rgb = (latents @ vae_params["kernel"]).reshape(b, h, w, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5)
  return jnp.mean(jnp.tanh(rgb.reshape(b, 8 * h, 8 * w, 3)), axis=-1)


def vae_params():
  return {"kernel": 0.5 * jax.random.normal(jax.random.key(7), (C, 8 * 8 * 3))}


def head_params():
  boxed = mask_decoders.LinearMaskHead().init(jax.random.key(8), jnp.zeros((1, H, W, C)))["params"]
  return nn.meta.unbox(boxed)


def make_batch(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  return {
    "latents": jax.random.normal(k[0], (B, 1, H, W, C)),
    "cond": jax.random.normal(k[1], (B, 1, H, W, C)),
    "context": jax.random.normal(k[2], (B, S, D)),
    "context_mask": jnp.arange(S)[None, :] < jnp.array([5, 3, 4, 2])[:, None],
    "mask": jax.random.choice(k[3], jnp.array([0, 1, 255], jnp.uint8), (B, 8 * H, 8 * W)),
  }


def nonzero_and_finite(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


# Rectified flow.


def test_flow_path_and_clean_estimate():
  k0, k1 = jax.random.split(jax.random.key(0))
  x0, eps = jax.random.normal(k0, (B, 1, H, W, C)), jax.random.normal(k1, (B, 1, H, W, C))
  t = jnp.array([0.0, 0.25, 0.8, 1.0])
  x_t = flow.noisy_latents(x0, eps, t)
  np.testing.assert_allclose(x_t[0], x0[0])
  np.testing.assert_allclose(x_t[3], eps[3])
  np.testing.assert_allclose(x_t[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-6)
  np.testing.assert_allclose(flow.velocity_target(x0, eps), eps - x0)
  np.testing.assert_allclose(flow.clean_estimate(x_t, eps - x0, t), x0, atol=1e-6)
  np.testing.assert_allclose(flow.dit_timesteps(t), [0.0, 250.0, 800.0, 1000.0])


# Text dropout.


def test_text_dropout_zeroes_features_and_key_mask():
  batch = make_batch()
  context, mask = guidance.drop_text(
    jax.random.key(1), batch["context"], batch["context_mask"], 1.0
  )
  assert not np.any(context) and not np.any(mask)
  kept, kept_mask = guidance.drop_text(
    jax.random.key(1), batch["context"], batch["context_mask"], 0.0
  )
  np.testing.assert_array_equal(kept, batch["context"])
  np.testing.assert_array_equal(kept_mask, batch["context_mask"])


def test_text_dropout_rate():
  n = 20_000
  context, _ = guidance.drop_text(jax.random.key(2), jnp.ones((n, 1, 1)), None, 0.3)
  assert abs(np.mean(np.asarray(context[:, 0, 0] == 0)) - 0.3) < 0.01


def test_only_generation_batches_drop_their_text():
  seen = {}

  def recording_dit(params, x, t_dit, context, context_mask, cond):
    seen["context"] = context
    return linear_dit(params, x, t_dit, context, context_mask, cond)

  batch, params = make_batch(), {"dit": linear_dit_params()}
  for task in (tasks.SEGMENTATION, tasks.GENERATION):
    losses.training_loss(
      recording_dit, params, batch, jax.random.key(0), task=task, config=loss_config("mse", 1.0)
    )
    dropped = not np.any(seen["context"])
    assert dropped == (task == tasks.GENERATION)


# Losses.


def test_masked_bce_ignores_255_pixels():
  logits = jax.random.normal(jax.random.key(3), (2, 4, 4))
  mask = jnp.array([[0, 1, 255, 1]] * 4, jnp.uint8)[None].repeat(2, 0)
  expected = np.mean(
    [
      np.log1p(np.exp(-x)) if y == 1 else np.log1p(np.exp(x))
      for x, y in zip(np.asarray(logits[0]).ravel(), np.asarray(mask[0]).ravel(), strict=True)
      if y != 255
    ]
  )
  bce = losses.masked_bce(logits, mask)
  np.testing.assert_allclose(bce[0], expected, rtol=1e-5)
  # Ignore pixels may hold anything; flipping a valid pixel changes the loss.
  np.testing.assert_allclose(losses.masked_bce(logits, mask.at[:, :, 2].set(255)), bce)
  assert not np.allclose(losses.masked_bce(logits, mask.at[:, 0, 0].set(1)), bce)
  assert float(losses.masked_bce(logits, jnp.full_like(mask, 255))[0]) == 0.0


@pytest.mark.parametrize("task", [tasks.SEGMENTATION, tasks.GENERATION])
def test_mse_loss_of_a_perfect_model_is_zero(task):
  batch = make_batch()
  loss = losses.training_loss(
    perfect_dit(batch["latents"]),
    {"dit": {}},
    batch,
    jax.random.key(0),
    task=task,
    config=loss_config(text_dropout=0.5),
  )
  assert float(loss) < 1e-9


@pytest.mark.parametrize("supervision", ["vae_bce", "linear_bce"])
def test_bce_formats_supervise_segmentation_only(supervision):
  batch = make_batch()
  params = {"dit": {}, "mask_head": head_params()}
  loss_of = functools.partial(
    losses.training_loss,
    perfect_dit(batch["latents"]),
    params,
    rng=jax.random.key(0),
    config=loss_config(supervision),
    vae_params=vae_params(),
    vae_mask_logits=vae_mask_logits,
  )
  # Generation stays on MSE (0 for the perfect model) and needs no mask; segmentation gets the
  # BCE of the decoded (here exact) clean latents.
  no_mask = {k: v for k, v in batch.items() if k != "mask"}
  assert float(loss_of(no_mask, task=tasks.GENERATION)) < 1e-9
  if supervision == "vae_bce":
    logits = vae_mask_logits(vae_params(), batch["latents"][:, 0])
  else:
    logits = mask_decoders.LinearMaskHead().apply(
      {"params": params["mask_head"]}, batch["latents"][:, 0]
    )
  expected = np.mean(losses.masked_bce(logits, batch["mask"]))
  np.testing.assert_allclose(loss_of(batch, task=tasks.SEGMENTATION), expected, rtol=1e-4)


@pytest.mark.parametrize("supervision", ["mse", "vae_bce", "linear_bce"])
def test_gradients_reach_the_model_and_head_never_the_vae(supervision):
  batch = make_batch()  # Segmentation: BCE gradients must cross the decoder.
  params = {"dit": linear_dit_params()}
  if supervision == "linear_bce":
    params["mask_head"] = head_params()

  def loss_fn(params, vae_params):
    return losses.training_loss(
      linear_dit,
      params,
      batch,
      jax.random.key(1),
      task=tasks.SEGMENTATION,
      config=loss_config(supervision),
      vae_params=vae_params,
      vae_mask_logits=vae_mask_logits,
    )

  grads, vae_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(params, vae_params())
  assert nonzero_and_finite(grads), grads
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(vae_grads))


def test_loss_errors_name_what_is_missing():
  batch = make_batch()
  loss_of = functools.partial(losses.training_loss, linear_dit, rng=jax.random.key(0))
  segmentation = dict(task=tasks.SEGMENTATION)
  with pytest.raises(KeyError, match="lacks 'mask'"):
    loss_of(
      {"dit": linear_dit_params()},
      {k: v for k, v in batch.items() if k != "mask"},
      config=loss_config("vae_bce"),
      **segmentation,
    )
  with pytest.raises(ValueError, match="segmentation_loss 'dice' unknown"):
    loss_of({"dit": {}}, batch, config=loss_config("dice"), **segmentation)
  with pytest.raises(ValueError, match="needs the LinearMaskHead parameters"):
    loss_of({"dit": linear_dit_params()}, batch, config=loss_config("linear_bce"), **segmentation)
  with pytest.raises(ValueError, match="task 2 unknown"):
    loss_of({"dit": linear_dit_params()}, batch, config=loss_config(), task=2)


def test_jitted_training_step_does_not_retrace():
  traces = collections.Counter()

  def loss_fn(params, batch, rng):
    traces["loss"] += 1
    return losses.training_loss(
      linear_dit, params, batch, rng, task=tasks.SEGMENTATION, config=loss_config("linear_bce")
    )

  step = jax.jit(jax.value_and_grad(loss_fn))
  params = {"dit": linear_dit_params(), "mask_head": head_params()}
  values = [step(params, make_batch(seed), jax.random.key(seed))[0] for seed in range(3)]
  assert traces["loss"] == 1
  assert len(set(float(v) for v in values)) == 3


# Mask decoders.


def test_linear_head_layout_and_logical_axes():
  boxed = mask_decoders.LinearMaskHead().init(jax.random.key(8), jnp.zeros((1, H, W, C)))
  specs = nn.get_partition_spec(boxed)["params"]["proj"]
  assert tuple(specs["kernel"]) == ("latent_channels", "mask_patch")
  head = head_params()
  latents = jax.random.normal(jax.random.key(4), (2, H, W, C))
  logits = mask_decoders.LinearMaskHead().apply({"params": head}, latents)
  assert logits.shape == (2, 8 * H, 8 * W)
  # Pixel (8i + a, 8j + b) is output a * 8 + b of the projection of latent pixel (i, j).
  proj = latents @ head["proj"]["kernel"] + head["proj"]["bias"]
  np.testing.assert_allclose(logits[1, 8 * 1 + 3, 8 * 2 + 5], proj[1, 1, 2, 3 * 8 + 5], rtol=1e-5)


# One-step segmentation.


@pytest.mark.parametrize("t, noise", [(1.0, "gaussian"), (0.7, "gaussian"), (1.0, "zeros")])
def test_one_step_with_a_perfect_model_returns_x0(t, noise):
  batch = make_batch()
  x0 = segment.one_step_latents(
    perfect_dit(batch["latents"]),
    {"dit": {}},
    batch["cond"],
    batch["context"],
    batch["context_mask"],
    config=segment_config(t=t, noise=noise),
  )
  np.testing.assert_allclose(x0, batch["latents"], atol=1e-6)


@pytest.mark.parametrize("decoder", ["vae", "linear"])
def test_segment_decodes_the_one_step_latents(decoder):
  batch = make_batch()
  params = {"dit": {}, "mask_head": head_params()}
  logits = segment.segment(
    perfect_dit(batch["latents"]),
    params,
    batch["cond"],
    batch["context"],
    batch["context_mask"],
    config=segment_config(decoder=decoder),
    vae_params=vae_params(),
    vae_mask_logits=vae_mask_logits,
  )
  expected = mask_decoders.decode_mask_logits(
    batch["latents"],
    decoder,
    head_params=params["mask_head"],
    vae_params=vae_params(),
    vae_mask_logits=vae_mask_logits,
  )
  assert logits.shape == (B, 8 * H, 8 * W)
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_segment_is_deterministic_per_seed_and_batch_independent():
  batch = make_batch()
  params = {"dit": linear_dit_params(), "mask_head": head_params()}
  traces = collections.Counter()

  def run(params, cond, context, context_mask, seed):
    traces[seed] += 1
    return segment.segment(
      linear_dit,
      params,
      cond,
      context,
      context_mask,
      config=segment_config(seed=seed, decoder="linear"),
    )

  run = jax.jit(run, static_argnums=4)
  args = (batch["cond"], batch["context"], batch["context_mask"])
  first, again, other = run(params, *args, 0), run(params, *args, 0), run(params, *args, 1)
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3
  alone = run(params, *(a[2:3] for a in args), 0)
  np.testing.assert_allclose(alone[0], first[2], atol=1e-5)
  shifted = run(params, *(jnp.roll(a, 1, axis=0) for a in args), 0)
  assert traces == {0: 2, 1: 1}  # One trace per (seed, shape); none for new values.
  np.testing.assert_allclose(shifted[3], first[2], atol=1e-5)


def test_segment_rejects_unknown_options():
  batch = make_batch()
  args = (
    linear_dit,
    {"dit": linear_dit_params()},
    batch["cond"],
    batch["context"],
    batch["context_mask"],
  )
  with pytest.raises(ValueError, match="noise 'uniform' unknown"):
    segment.segment(*args, config=segment_config(noise="uniform"))
  with pytest.raises(ValueError, match="mask decoder 'pca' unknown"):
    segment.segment(*args, config=segment_config(decoder="pca"))
  with pytest.raises(ValueError, match="needs vae_params"):
    segment.segment(*args, config=segment_config(decoder="vae"))
