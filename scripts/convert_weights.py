#!/usr/bin/env python3
"""Convert MAE weights (official .pth, timm state dict, Hugging Face ViTMAE) to our orbax format.

  python scripts/convert_weights.py mae_visualize_vit_base.pth ckpt/mae_base_dem \\
      --in-chans 1 --channel-adapt sum
  python scripts/convert_weights.py mae_pretrain_vit_base.pth ckpt/enc --encoder-only
  python scripts/convert_weights.py hf_vit_mae_dir/ ckpt/hf --img-size 256

The output directory (orbax state/ + config.json) loads with `api.from_pretrained(DST)`.
"""

import argparse
import logging

from demmae_jax import api, checkpoints
from demmae_jax.models.mae import PRESETS


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "src",
    help="checkpoint to read: .pth/.pt/.bin/.ckpt (needs torch), .safetensors, "
    "a Hugging Face directory, or one of our checkpoint directories",
  )
  p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
  p.add_argument(
    "--in-chans",
    type=int,
    help="input channels of the model (1 for a DEM); with RGB weights also pass --channel-adapt",
  )
  p.add_argument(
    "--channel-adapt",
    choices=checkpoints.CHANNEL_ADAPT,
    help="sum/mean: reduce the RGB patch kernel to 1 channel (sum == feeding the DEM "
    "repeated 3x); repeat: keep 3 channels, the caller repeats the DEM",
  )
  p.add_argument(
    "--encoder-only",
    action="store_true",
    help="load the encoder only and initialise the decoder (mae_pretrain_vit_*.pth)",
  )
  p.add_argument(
    "--img-size",
    type=int,
    help="model image size; position embeddings are interpolated (bicubic) if the grid changes",
  )
  p.add_argument(
    "--preset",
    choices=sorted(PRESETS),
    help="architecture to build (default: read off the checkpoint's tensor shapes)",
  )
  p.add_argument("--num-heads", type=int, help="encoder heads, when the width is not a preset's")
  p.add_argument("--decoder-num-heads", type=int, help="decoder heads, likewise")
  p.add_argument(
    "--norm-pix-loss",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="record norm_pix_loss in the config (default: checkpoint's or False)",
  )
  p.add_argument(
    "--drop-head",
    action="store_true",
    help="skip a finetuned classifier's head.* and fc_norm.* tensors",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of any freshly initialised decoder")
  p.add_argument("--overwrite", action="store_true", help="replace an existing DST (atomically)")
  p.add_argument("--debug", action="store_true", help="on an error, also print the traceback")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  logging.getLogger("demmae_jax").setLevel(logging.INFO)  # what was adapted; not orbax's chatter
  overrides = {
    k: v
    for k, v in dict(
      in_chans=args.in_chans,
      img_size=args.img_size,
      num_heads=args.num_heads,
      decoder_num_heads=args.decoder_num_heads,
      norm_pix_loss=args.norm_pix_loss,
    ).items()
    if v is not None
  }
  from data_pipelines.atomic import check_outputs
  from demmae_jax.train import cli

  def convert():
    check_outputs([args.dst], [args.src])  # dst is replaced as a whole: never the source
    model = api.from_pretrained(
      args.src,
      config=args.preset,
      encoder_only=args.encoder_only,
      channel_adapt=args.channel_adapt,
      drop_head=args.drop_head,
      seed=args.seed,
      **overrides,
    )
    dst = api.save_model(model, args.dst, overwrite=args.overwrite)
    print(f"wrote {dst} ({model.config})")

  return cli.guarded("convert_weights", convert, debug=args.debug)


if __name__ == "__main__":
  from demmae_jax.train import cli

  cli.exit(main())
