"""GenMask on one accelerator: our JAX step and segmenter against diffusers' PyTorch models.

  python -m benchmarks.gpu            # 1.3B DiT + WAN VAE, 512x512, bf16 (a GPU)
  python -m benchmarks.gpu --mid      # mid-size DiT, small VAE, fp32 (CPU figures)
  python -m benchmarks.gpu --tiny     # tiny models (a CPU smoke test for CI)
  python -m benchmarks.gpu --remat=dots_attention --dtype=bfloat16   # a preset's settings changed

Both sides get random weights of the same architecture and the same work, on the same device:
- train step: VAE-encode the segmentation masks, their images and the generation images
  (frozen, no gradient), DiT forward and backward on the segmentation sub-batch (N noisy + N
  condition tokens, per-token timesteps) and the generation sub-batch (N tokens), MSE on the
  velocity, global-norm clipping and AdamW with fp32 master weights. Ours is
  `genmask_jax.training.train.train_step` (remat policy from the preset or --remat); diffusers'
  model runs under autocast with gradient checkpointing when ours rematerializes.
- one-step segmentation: image encode, one DiT forward at t = 1, VAE decode to mask logits;
  weights in the compute dtype; masks/s at each batch size, and the IoU of the largest batch's
  masks with the same model's in fp32 (weights and compute; 1 when the preset is fp32).
MFU divides the analytic model FLOPs (genmask_jax/models/flops.py; no recomputation counted) by
the step time and the device's dense bf16 peak. Peak memory is the allocator's high-water mark
on a GPU; on CPU, ours is XLA's compile-time estimate and diffusers' is not measured.
"""

from __future__ import annotations

import os

# Both frameworks share the device: JAX allocates on demand instead of taking 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import gc  # noqa: E402
import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from configs import models as model_configs  # noqa: E402
from configs.genmask import get_config  # noqa: E402
from genmask_jax.conversion.dit import diffusers_kwargs  # noqa: E402
from genmask_jax.models.dit import REMAT_POLICIES  # noqa: E402
from genmask_jax.models.flops import train_step_flops  # noqa: E402
from genmask_jax.models.genmask import Models  # noqa: E402
from genmask_jax.models.vae import spatial_stride  # noqa: E402
from genmask_jax.runs.model import frozen_vae_params, segmenter  # noqa: E402
from genmask_jax.runtime import sharding  # noqa: E402
from genmask_jax.training import train  # noqa: E402
from genmask_jax.training.optimizer import make_optimizer  # noqa: E402

PRESETS = {
  "1.3b": dict(
    dit="1.3b", resolution=512, text_len=512, train_batch=8,
    segment_batches=(1, 32), dtype="bfloat16", remat="full", repeats=5,
  ),
  "mid": dict(
    dit="mid", resolution=512, text_len=512, train_batch=1,
    segment_batches=(1, 4), dtype="float32", remat="none", repeats=2,
  ),
  "tiny": dict(
    dit="tiny", resolution=32, text_len=8, train_batch=2,
    segment_batches=(1,), dtype="float32", remat="none", repeats=1,
  ),
}  # fmt: skip
# Dense bf16 peak of a device, by a substring of its name (first match wins).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
GIB = 2**30
SEGMENT_KEYS = ("image", "text", "text_mask")


# ---------------------------------------------------------------- shared set-up


def benchmark_config(preset: dict, attention: str) -> ml_collections.ConfigDict:
  config = get_config(preset["dit"])
  config.dit.update(dtype=preset["dtype"], remat_policy=preset["remat"], attention=attention)
  config.vae.dtype = preset["dtype"]
  config.data.text_len = preset["text_len"]
  return config


def host_batch(config, batch: int, resolution: int, rng: np.random.Generator) -> dict:
  """A train batch of random images, masks and text features, as the data pipeline makes."""
  image = lambda: rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
  text = lambda: rng.standard_normal((batch, config.data.text_len, config.dit.text_dim))
  text_mask = np.ones((batch, config.data.text_len), bool)
  mask = rng.integers(0, 2, (batch, resolution, resolution)).astype(np.uint8)
  return {
    "segmentation": dict(
      image=image(), mask=mask, text=text().astype(np.float32), text_mask=text_mask
    ),
    "generation": dict(image=image(), text=text().astype(np.float32), text_mask=text_mask),
  }


# ---------------------------------------------------------------- ours (JAX)


def inference_weights(params, dtype: str):
  """Matmul and conv kernels in the compute dtype; norms, biases and modulation stay fp32."""
  cast = lambda path, x: x.astype(dtype) if path[-1].key == "kernel" else x
  return jax.tree_util.tree_map_with_path(cast, params)


def jax_benchmark(config, preset: dict, data: dict) -> dict:
  """Train-step seconds, peak bytes and masks/s per segmentation batch size."""
  device = jax.local_devices()[0]
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), [device])
  rules = sharding.rules()
  models, optimizer = Models.from_config(config), make_optimizer(config.optimizer)
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = train.initial_train_state(models, config, optimizer, mesh, rules)
    vae = frozen_vae_params(models, config, mesh, rules)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = train.compile_train_step(models, config, optimizer, shardings, mesh)
    batch = train.device_batch(data, mesh)
    rng = jax.random.key(0)
    step = step.lower(state, vae, batch, rng).compile()
    holder = [state]

    def run_step():
      holder[0], metrics = step(holder[0], vae, batch, rng)
      jax.block_until_ready(metrics)

    results["train_s"] = median_seconds(run_step, preset["repeats"])
    stats = device.memory_stats()
    if stats:
      results["peak_bytes"] = stats["peak_bytes_in_use"]
    else:  # CPU: XLA's estimate for the compiled step.
      m = step.memory_analysis()
      results["peak_bytes"] = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
      )

    fp32_params, fp32_vae = {"dit": holder[0].params["dit"]}, vae
    params = {"dit": inference_weights(holder[0].params["dit"], config.dit.dtype)}
    vae = inference_weights(vae, config.vae.dtype)
    segment = segmenter(models, config)
    for b in preset["segment_batches"]:
      part = data["segmentation"]  # Its first b samples, repeated if b is larger.
      inputs = [jax.device_put(np.resize(part[k], (b, *part[k].shape[1:]))) for k in SEGMENT_KEYS]
      run = lambda inputs=inputs: segment(params, vae, *inputs).block_until_ready()
      results[f"segment_{b}"] = b / median_seconds(run, preset["repeats"])
    # The masks of the largest batch against the same model's in fp32 (weights and compute).
    config32 = config.copy_and_resolve_references()
    config32.dit.dtype = config32.vae.dtype = "float32"
    segment32 = segmenter(Models.from_config(config32), config32)
    ref = np.asarray(segment32(fp32_params, fp32_vae, *inputs) > 0)
    masks = np.asarray(segment(params, vae, *inputs) > 0)
    results["mask_iou_vs_fp32"] = (masks & ref).sum() / max((masks | ref).sum(), 1)
  return results


# ---------------------------------------------------------------- theirs (diffusers, PyTorch)


def torch_models(config):
  import diffusers

  cfg = config.dit
  dit = diffusers.WanTransformer3DModel(**diffusers_kwargs(cfg))
  vae = diffusers.AutoencoderKLWan(
    base_dim=config.vae.base_dim,
    z_dim=config.vae.z_dim,
    dim_mult=list(config.vae.dim_mult),
    num_res_blocks=config.vae.num_res_blocks,
  )
  return dit, vae.eval().requires_grad_(False)


def torch_benchmark(config, preset: dict, data: dict, device: torch.device) -> dict:
  """The same measurements for diffusers' WanTransformer3DModel and AutoencoderKLWan."""
  dit, vae = (m.to(device) for m in torch_models(config))
  if preset["remat"] != "none":
    dit.enable_gradient_checkpointing()
  compute = {"bfloat16": torch.bfloat16, "float32": torch.float32}[preset["dtype"]]
  autocast = lambda: torch.autocast(device.type, compute, enabled=compute != torch.float32)
  mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
  std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
  frames = lambda images: torch.from_numpy(images).to(device).permute(0, 3, 1, 2)[:, :, None]

  def encode(images):
    return (vae.encode(images).latent_dist.mode() - mean) / std

  opt = config.optimizer
  adamw = torch.optim.AdamW(
    dit.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=0.0
  )
  seg, gen = data["segmentation"], data["generation"]
  seg_images, gen_images = frames(seg["image"]), frames(gen["image"])
  mask_images = frames(np.repeat(np.where(seg["mask"] == 1, 1.0, -1.0)[..., None], 3, -1))
  mask_images = mask_images.float()
  seg_text, gen_text = (torch.from_numpy(d["text"]).to(device) for d in (seg, gen))
  batch = seg_images.shape[0]

  def velocity_loss(x0, cond, text):
    t = torch.rand(batch, device=device)
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    tokens = x0[0, 0].numel() // math.prod(config.dit.patch_size)  # per frame
    timestep = (1000 * t)[:, None].expand(batch, tokens)
    if cond is not None:  # Condition tokens: a second frame at t = 0.
      x_t = torch.cat([x_t, cond], dim=2)
      timestep = torch.cat([timestep, torch.zeros_like(timestep)], dim=1)
    v = dit(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    return torch.mean((v[0][:, :, :1].float() - (eps - x0)) ** 2)

  def step():
    with autocast():
      with torch.no_grad():
        mask_latents, cond, gen_latents = map(encode, (mask_images, seg_images, gen_images))
      loss = velocity_loss(mask_latents.float(), cond, seg_text)
      loss = (loss + velocity_loss(gen_latents.float(), None, gen_text)) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), opt.grad_clip)
    adamw.step()
    adamw.zero_grad(set_to_none=True)
    synchronize()

  synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  results = {}
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  results["train_s"] = median_seconds(step, preset["repeats"])
  if device.type == "cuda":
    results["peak_bytes"] = torch.cuda.max_memory_allocated(device)
  # Inference weights in the compute dtype, except the modules diffusers keeps in fp32.
  for model in (dit, vae):
    model.eval().requires_grad_(False)
    for name, p in model.named_parameters():
      if not set(name.split(".")) & set(model._keep_in_fp32_modules or ()):
        p.data = p.data.to(compute)

  noise = torch.Generator(device)

  @torch.no_grad()
  def segment(images, text):
    cond = encode(images.to(compute)).to(compute)  # The latent statistics are fp32.
    eps = torch.randn((1, *cond.shape[1:]), device=device, generator=noise.manual_seed(0))
    x_t = eps.expand_as(cond).to(compute)  # t = 1: pure noise.
    tokens = cond[0, 0].numel() // math.prod(config.dit.patch_size)
    b = len(cond)
    timestep = torch.cat([torch.full((b, tokens), 1000.0), torch.zeros(b, tokens)], dim=1)
    v = dit(
      hidden_states=torch.cat([x_t, cond], dim=2),
      timestep=timestep.to(device),
      encoder_hidden_states=text.to(compute),
      return_dict=False,
    )[0][:, :, :1]
    decoded = vae.decode((x_t - v) * std.to(compute) + mean.to(compute)).sample.clamp(-1, 1)
    logits = decoded.float().mean(dim=1)[:, 0]
    synchronize()
    return logits

  for b in preset["segment_batches"]:
    images = frames(np.resize(seg["image"], (b, *seg["image"].shape[1:])))
    text = torch.from_numpy(np.resize(seg["text"], (b, *seg["text"].shape[1:]))).to(device)
    run = lambda images=images, text=text: segment(images, text)
    results[f"segment_{b}"] = b / median_seconds(run, preset["repeats"])
  return results


# ---------------------------------------------------------------- report


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def report(ours: dict, theirs: dict, flops: int, peak: float | None, preset: dict) -> list[str]:
  rows = [("train step (s)", "train_s", 1.0), ("train peak memory (GiB)", "peak_bytes", 1 / GIB)]
  rows += [(f"segment batch {b} (masks/s)", f"segment_{b}", 1.0) for b in preset["segment_batches"]]
  lines = [f"{'(s: lower is better)':<28} {'ours':>10} {'diffusers':>10} {'ours/diffusers':>15}"]
  for label, key, scale in rows:
    a, b = ours.get(key), theirs.get(key)
    fmt = lambda x, scale=scale: f"{x * scale:>10.4g}" if x is not None else f"{'n/a':>10}"
    ratio = f"{a / b:>15.3g}" if a is not None and b is not None else f"{'n/a':>15}"
    lines.append(f"{label:<28} {fmt(a)} {fmt(b)} {ratio}")
  lines.append(f"{'masks vs fp32 (IoU)':<28} {ours['mask_iou_vs_fp32']:>10.4f}")
  if peak:
    mfu = lambda r: flops / r["train_s"] / peak
    lines.append(f"{'train MFU':<28} {mfu(ours):>10.1%} {mfu(theirs):>10.1%}")
  return lines


flags.DEFINE_bool("mid", False, "mid-size models, fp32 (CPU figures)")
flags.DEFINE_bool("tiny", False, "tiny models (CPU smoke test)")
flags.DEFINE_integer("repeats", None, "timed repetitions (default: the preset's)")
flags.DEFINE_float("peak_tflops", None, "device peak for MFU (default: by name)")
flags.DEFINE_enum("remat", None, ["none", *REMAT_POLICIES], "(default: the preset's)")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "(default: the preset's)")
flags.mark_bool_flags_as_mutual_exclusive(["mid", "tiny"])


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS

  preset = dict(PRESETS["mid" if args.mid else "tiny" if args.tiny else "1.3b"])
  preset.update({k: getattr(args, k) for k in ("repeats", "remat", "dtype") if getattr(args, k)})
  jax_device = jax.local_devices()[0]
  on_gpu = jax_device.platform == "gpu"
  if on_gpu != torch.cuda.is_available():
    raise SystemExit(
      f"JAX runs on {jax_device.platform} but torch.cuda.is_available() is "
      f"{torch.cuda.is_available()}: both must use the same device"
    )
  torch_device = torch.device("cuda" if on_gpu else "cpu")
  config = benchmark_config(preset, attention="cudnn" if on_gpu else "xla")
  data = host_batch(config, preset["train_batch"], preset["resolution"], np.random.default_rng(0))
  batch = preset["train_batch"]
  flops = train_step_flops(config, batch, batch, preset["resolution"])

  theirs = torch_benchmark(config, preset, data, torch_device)  # First: JAX keeps its pool.
  if on_gpu:
    gc.collect()
    torch.cuda.empty_cache()
  ours = jax_benchmark(config, preset, data)

  name = jax_device.device_kind
  tokens = (preset["resolution"] // spatial_stride(config.vae.dim_mult) // 2) ** 2
  print(f"device: {name} (torch {torch_device}, {torch.get_num_threads()} CPU threads)")
  print(
    f"DiT {preset['dit']} ({config.dit.num_layers} layers, dim {config.dit.dim}), VAE "
    f"{model_configs.VAE_OF_DIT[preset['dit']]}, {preset['resolution']}x{preset['resolution']}, "
    "text "
    f"{preset['text_len']}, {preset['dtype']}; ours: attention {config.dit.attention}, remat "
    f"{preset['remat']}; diffusers: SDPA"
    + (", gradient checkpointing" if preset["remat"] != "none" else "")
  )
  print(
    f"train step: {preset['train_batch']} segmentation ({tokens} noisy + {tokens} condition "
    f"tokens) + {preset['train_batch']} generation ({tokens} tokens) samples, "
    f"{flops / 1e12:.3f} TFLOP (analytic)"
  )
  print("\n".join(report(ours, theirs, flops, peak_flops(name, args.peak_tflops), preset)))


if __name__ == "__main__":
  app.run(main)
