"""The few-label probe of an encoder (demmae_jax/probe.py): views, the linear pixel map, a model."""

import numpy as np

from demmae_jax import probe
from demmae_jax.models import mae as mae_model
from demmae_jax.models.vit import patchify


def _scene(n=6, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (n, size, size, 1)).astype(np.float32)
  labels = (images[..., 0] > 0.6).astype(np.uint8)
  labels[:, :2] = probe.IGNORE  # ignored rows are never scored
  return probe.ProbeData(images, labels)


def test_symmetries_move_labels_with_images():
  data = _scene()
  views = probe.symmetries(data)
  assert views.images.shape == (8 * 6, 16, 16, 1)
  known = views.labels != probe.IGNORE
  np.testing.assert_array_equal(views.labels[known], (views.images[..., 0] > 0.6)[known])
  first = views.images[::6]  # the 8 views of tile 0 are all different
  assert len({v.tobytes() for v in first}) == 8


def test_linear_map_puts_each_logit_on_its_own_pixel():
  # tokens that are the patch's own pixels: a pixel-exact threshold is linear in them, so the
  # probe reaches it only if logits land on the pixels they came from
  train, val = _scene(seed=0), _scene(seed=1)
  tok = lambda d: np.asarray(patchify(d.images, 4))  # noqa: E731
  good = probe.fit_and_score(tok(train), train, tok(val), val, patch=4, steps=400, lr=3e-2)
  # measured 0.78 (the class weights move the decision threshold off 0.6), wrong places 0.26
  assert good["iou"] > 0.7
  shuffled = tok(val)[:, ::-1]  # the same tokens at the wrong places
  bad = probe.fit_and_score(tok(train), train, shuffled, val, patch=4, steps=400, lr=3e-2)
  assert bad["iou"] < 0.4


def test_probe_model_on_a_tiny_mae():
  model = mae_model.build(
    "tiny",
    img_size=16,
    patch_size=4,
    in_chans=1,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
  )
  out = probe.probe_model(
    model, [_scene(n=2, seed=0), _scene(n=2, seed=2)], _scene(seed=1), steps=50
  )
  assert len(out["draws"]) == 2 and 0 <= out["iou"] <= 1
  assert out["iou"] > 0.3  # random projections of a patch still carry its pixels
