"""Public API of the masked DEM autoencoder.

  from demmae_jax import mae
  model = mae.from_pretrained("mae_visualize_vit_base.pth")     # or a HF dir, or our checkpoint
  loss, pred, mask = model(images_nhwc, noise=noise)            # or key=jax.random.key(0)
  feats = model.encode(images_nhwc, layers=(3, 5, 7, 11))       # [N, 1 + L, D] each, cls first
  mae.save_model(model, "runs/ckpt")                             # orbax state/ + config.json
"""
from demmae_jax.checkpoints import CheckpointError, from_pretrained, save_model, to_official
from demmae_jax.models.mae import MAEConfig, MaskedAutoencoder, build, preset

__all__ = ["CheckpointError", "MAEConfig", "MaskedAutoencoder", "build", "from_pretrained",
           "preset", "save_model", "to_official"]
