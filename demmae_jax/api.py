"""Public API of the masked DEM autoencoder: the few names a user needs, from one module.

  from demmae_jax import api
  model = api.from_pretrained("mae_visualize_vit_base.pth")     # or a HF dir, or our checkpoint
  loss, pred, mask = model(images_nhwc, noise=noise)            # or key=jax.random.key(0)
  feats = model.encode(images_nhwc, layers=(3, 5, 7, 11))       # [N, 1 + L, D] each, cls first
  api.save_model(model, "runs/ckpt")                             # orbax state/ + config.json
  model = api.build("base", in_chans=1)                          # a fresh model from a preset

It only re-exports: the model from `models/mae.py`, the weight port from `checkpoints.py`. It was
`demmae_jax/mae.py`, a name that paired confusingly with `models/mae.py` (issue 14); `api` says
what it is, a facade, and not another model. The `"demmae_jax.mae/1"` written into our
checkpoints' config.json is a file-format name, not this module's path, and stays.
"""

from demmae_jax.checkpoints import CheckpointError, from_pretrained, save_model, to_official
from demmae_jax.models.mae import MAEConfig, MaskedAutoencoder, build, preset

__all__ = [
  "CheckpointError",
  "MAEConfig",
  "MaskedAutoencoder",
  "build",
  "from_pretrained",
  "preset",
  "save_model",
  "to_official",
]
