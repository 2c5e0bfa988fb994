"""Memory and compute of the DiT's rematerialization policies (XLA compile-time analysis).

  python -m benchmarks.remat_memory --size=mid --tokens=1024 --batch=2 --repeats=3

For each policy, compiles the loss and gradient of the DiT on N noisy + N condition tokens and
a text, and reports XLA's temporary memory (the activations kept for the backward pass plus
scratch), XLA's FLOP count of the compiled step (recomputation shows up here; XLA counts the body
of the layer scan once, so this is the embeddings plus one block, forward and backward) and,
with --repeats > 0, the measured step time on this machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs.models import wan_dit
from genmask_jax.models.dit import REMAT_POLICIES, WanDiT

MIB = 2**20


def loss_and_grad(cfg, policy: str):
  model = WanDiT(**{**cfg.to_dict(), "remat_policy": policy})

  def loss(params, x, t, context, cond):
    return jnp.mean(jnp.square(model.apply({"params": params}, x, t, context, cond=cond)))

  return jax.jit(jax.value_and_grad(loss))


flags.DEFINE_string("size", "mid", "DiT preset of configs/models.py")
flags.DEFINE_integer("tokens", 1024, "noisy tokens (= condition tokens)")
flags.DEFINE_integer("text_len", 512, "Text length in tokens (padded).")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
flags.DEFINE_string("attention", "xla", "attention kernel")
flags.DEFINE_integer("repeats", 3, "timed steps; 0: compile only")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS

  cfg = wan_dit(args.size)
  cfg.update(dtype=args.dtype, attention=args.attention)
  side = int(round(args.tokens**0.5))
  if side * side != args.tokens:
    raise SystemExit("--tokens must be a square number")
  rng = np.random.default_rng(0)
  latent = (args.batch, 1, 2 * side, 2 * side, cfg.in_dim)
  x, cond = (rng.standard_normal(latent).astype(np.float32) for _ in range(2))
  context = rng.standard_normal((args.batch, args.text_len, cfg.text_dim)).astype(np.float32)
  t = np.full((args.batch,), 700.0, np.float32)
  params = WanDiT(**cfg.to_dict()).init(jax.random.key(0), x, t, context, cond=cond)["params"]
  inputs = (params, x, t, context, cond)

  print(f"device: {jax.devices()[0].device_kind}")
  print(
    f"DiT {args.size} ({cfg.num_layers} layers, dim {cfg.dim}), {args.dtype}, attention "
    f"{args.attention}: batch {args.batch} x ({args.tokens} noisy + {args.tokens} condition "
    f"tokens), text {args.text_len}"
  )
  print(
    f"{'policy':>20} {'temp MiB':>10} {'vs none':>8} {'1-block GFLOP':>14} {'vs none':>8} "
    f"{'step s':>8}"
  )
  base = None
  for policy in ["none", *REMAT_POLICIES]:
    compiled = loss_and_grad(cfg, policy).lower(*inputs).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    flops = compiled.cost_analysis()["flops"]
    base = base or (temp, flops)
    step = float("nan")
    if args.repeats:
      jax.block_until_ready(compiled(*inputs))  # Warm-up.
      start = time.perf_counter()
      for _ in range(args.repeats):
        jax.block_until_ready(compiled(*inputs))
      step = (time.perf_counter() - start) / args.repeats
    print(
      f"{policy:>20} {temp / MIB:>10.1f} {temp / base[0]:>8.2f} {flops / 1e9:>14.2f} "
      f"{flops / base[1]:>8.2f} {step:>8.2f}"
    )


if __name__ == "__main__":
  app.run(main)
