"""The MAE training step (value_and_grad + AdamW, jitted) with each attention path, timed in one
process, the variants interleaved so that a busy machine slows them alike; best of N steps each.

  python benchmarks/attention_step.py --preset cpu --batch 32 --steps 10

Presets: `cpu` (configs/dem_pretrain.py:cpu's model: 64 px, patch 8, width 192, 6 + 2 blocks),
`tiny`, or an MAE preset name (`base`: ViT-B/16 at 224 px). Prints ms per step and the compiled
temporaries for attention explicit / xla, with remat off and on.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import optax
from flax import nnx

from demmae_jax.models import mae

CPU = dict(
  img_size=64,
  patch_size=8,
  in_chans=1,
  embed_dim=192,
  depth=6,
  num_heads=3,
  decoder_embed_dim=128,
  decoder_depth=2,
  decoder_num_heads=4,
)


def build_step(preset: str, batch: int, attention: str, remat: bool):
  if preset == "cpu":
    model = mae.build("tiny", **CPU, attention=attention, remat=remat)
  else:
    model = mae.build(preset, in_chans=1, attention=attention, remat=remat)
  c = model.config
  graphdef, params = nnx.split(model)
  tx = optax.adamw(1e-4)
  opt = tx.init(params)
  images = jax.random.normal(jax.random.key(0), (batch, c.img_size, c.img_size, c.in_chans))

  def step(p, o, x, key):
    loss, g = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(x, key=key)[0])(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  compiled = (
    jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, images, jax.random.key(1)).compile()
  )
  state = [params, opt]

  def once(i: int) -> float:
    t0 = time.perf_counter()
    state[0], state[1], loss = compiled(state[0], state[1], images, jax.random.key(i))
    jax.block_until_ready(loss)
    return time.perf_counter() - t0

  once(0)  # warm-up
  return once, compiled.memory_analysis().temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="cpu")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--remat", choices=["off", "on", "both"], default="both")
  args = ap.parse_args()
  remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
  variants = {
    (a, r): build_step(args.preset, args.batch, a, r) for r in remats for a in ("explicit", "xla")
  }
  best = {k: float("inf") for k in variants}
  for i in range(1, args.steps + 1):
    for k, (once, _) in variants.items():
      best[k] = min(best[k], once(i))
  print(
    f"preset {args.preset}, batch {args.batch}, best of {args.steps} steps, backend "
    f"{jax.default_backend()}, load average {os.getloadavg()[0]:.1f}"
  )
  print("| attention | remat | ms / step | compiled temporaries (MiB) |\n|---|---|---|---|")
  for (a, r), t in best.items():
    print(f"| {a} | {'on' if r else 'off'} | {t * 1e3:.1f} | {variants[(a, r)][1] / 2**20:.1f} |")


if __name__ == "__main__":
  main()
