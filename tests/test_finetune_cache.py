"""The frozen-encoder feature cache (`config.cache_features`): the cached step equals the full
frozen step (loss and head gradients), the cache holds each symmetry's
features and resumes its batch stream, a cached run on real Delft tiles learns and leaves a
checkpoint that loads and evaluates as any other, and the settings it cannot serve are refused."""

import json
import re

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from data_pipelines.augment import symmetry
from demmae_jax import config_files, sharding
from demmae_jax.inference.evaluate import evaluate_split
from demmae_jax.inference.restore import load_trained
from demmae_jax.inference.segmenter import build_from_spec
from demmae_jax.train import feature_cache, finetune
from demmae_jax.train.pretrain import model_config


def get_config(preset="tiny", **overrides):
  return config_files.get_config(
    "finetune", preset, **{"log.progress": False, "log.tensorboard": False, **overrides}
  )


def tiny_task(config):
  manifest = {
    "tile_size": 32,
    "cell_size": 0.5,
    "label_names": {"0": "background", "1": "building"},
  }
  backbone = model_config(config.model.backbone).replace(img_size=32, in_chans=1)
  spec = finetune.model_spec(config, manifest, backbone)
  return finetune.Finetune(config, spec, np.array([0.6, 1.4], np.float32))


def random_batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 2, (n, 32, 32)).astype(np.int32)
  label[:, :4] = 255  # ignored rows
  valid = (rng.random((n, 32, 32)) > 0.1).astype(np.float32)
  return {
    "image": rng.normal(size=(n, 32, 32, 1)).astype(np.float32),
    "label": label,
    "valid": valid,
  }


encoder_maps = nnx.jit(lambda model, images: model.encoder_maps(images))


def cached(model, batch):
  maps = encoder_maps(model, batch["image"])
  return {
    **dict(zip(feature_cache.FEATURE_KEYS, map(np.asarray, maps))),
    "label": batch["label"],
    "valid": batch["valid"],
  }


@pytest.fixture(scope="module")
def tiny():
  task = tiny_task(get_config())
  return task, task.build_model()


def test_cached_loss_and_head_gradients_equal_the_frozen_step(tiny):
  task, model = tiny
  graphdef, params, rest = nnx.split(model, task.trainable, ...)
  assert not any(
    "backbone" in sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  )
  batch = random_batch()
  key = jax.random.key(3)  # the head's dropout: the same draws in both paths

  @jax.jit
  def loss_and_grads(params, batch):
    loss_of = lambda p: task.loss_fn(nnx.merge(graphdef, p, rest), batch, key)
    return jax.value_and_grad(loss_of, has_aux=True)(params)

  (loss, aux), grads = loss_and_grads(params, batch)
  (c_loss, c_aux), c_grads = loss_and_grads(params, cached(model, batch))
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(c_aux["pixel_acc"], aux["pixel_acc"], rtol=1e-6)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) > 20 and all(np.abs(np.asarray(g)).max() > 0 for _, g in flat[:5])
  # the same tree (a leaf missing on one side must fail, not be cut off by zip)
  assert jax.tree.structure(c_grads) == jax.tree.structure(grads)
  for (path, g), c in zip(flat, jax.tree.leaves(c_grads), strict=True):
    np.testing.assert_allclose(c, g, rtol=1e-5, atol=1e-6, err_msg=sharding.path_str(path))
  # dropout is on in both (another key, another loss): the cached path keeps the head's dropout
  other = jax.jit(lambda p, b: task.loss_fn(nnx.merge(graphdef, p, rest), b, jax.random.key(4))[0])
  assert abs(float(other(params, cached(model, batch))) - float(c_loss)) > 1e-6


def test_cache_holds_every_symmetry_and_resumes_its_batches(tiny):
  _, model = tiny
  batch = random_batch(n=5, seed=2)
  cache = feature_cache.build(model, iter([batch]), batch_size=4)  # a padded last batch
  assert cache.num_tiles == 5 and cache.features[0].shape == (8, 5, 8, 8, 64)
  for s in (0, 1, 6):
    images = symmetry(tf.constant(batch["image"]), s).numpy()
    for f, want in zip(cache.features, encoder_maps(model, images)):
      np.testing.assert_allclose(f[s], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.label[s], symmetry(tf.constant(batch["label"]), s).numpy())
  assert not np.array_equal(cache.features[0][0], cache.features[0][1])  # a ViT is not equivariant
  stream = cache.batches(0, 8, (0, 8), seed=0)
  first = [next(stream) for _ in range(4)]
  resumed = next(cache.batches(3, 8, (0, 8), seed=0))
  for k in first[3]:
    np.testing.assert_array_equal(resumed[k], first[3][k])
  half = next(cache.batches(3, 8, (4, 8), seed=0))  # another process's rows of the same batch
  np.testing.assert_array_equal(half["label"], first[3]["label"][4:])
  assert first[0]["label"].dtype == np.int32 and first[0]["valid"].dtype == np.float32
  assert not np.array_equal(first[0]["feature_0"], first[1]["feature_0"])


@pytest.mark.parametrize(
  "preset, overrides, match",
  [
    ("tiny", {"freeze_backbone": False}, r"cache_features=True needs freeze_backbone=True"),
    ("tiny_unet", {}, r"cache_features=True .* model.kind='unet' has no encoder"),
  ],
)
def test_cache_refuses_what_it_cannot_serve(preset, overrides, match, tmp_path):
  config = get_config(preset, cache_features=True, **overrides)
  with pytest.raises(ValueError, match=match):
    finetune.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.fixture(scope="module")
def delft_tiles(tmp_path_factory):
  from data_pipelines.prepare import prepare_delft

  out = tmp_path_factory.mktemp("delft") / "buildings"
  return prepare_delft(out, "buildings", tile_size=32, stride=16, progress=False)


@pytest.mark.realdata
@pytest.mark.slow
def test_cached_run_learns_resumes_and_its_checkpoint_evaluates(delft_tiles, tmp_path, capsys):
  workdir = tmp_path / "cached"
  config = get_config(
    cache_features=True,
    total_steps=48,
    eval_every_steps=24,
    **{"checkpoint.every_steps": 24, "data.manifest": str(delft_tiles)},
  )
  first = finetune.run(config, workdir, stop_after=24)
  second = finetune.run(config, workdir)  # rebuilds the cache, continues the batch stream
  assert first.step == 24 and second.step == 48 and second.history[0]["step"] > 24
  out = capsys.readouterr().out
  assert "feature cache:" in out
  # --dry_run plans the same step from the cached maps' shapes, without building the cache
  peak = re.search(r"-> peak (\S+ \S+) of", out).group(1)
  assert finetune.dry_run(config, tmp_path / "dry") == 0 and not (tmp_path / "dry").exists()
  dry = capsys.readouterr().out
  assert f"the step needs {peak} per device" in dry and "feature cache:" not in dry
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["main_loss"] for r in rows if "main_loss" in r]
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2]), losses
  # the checkpoint is the whole segmenter; its encoder is the one the cache was computed with
  model, spec, step = load_trained(workdir)
  assert step in (24, 48) and spec["freeze_backbone"]
  eager = build_from_spec(spec, int(config.seed))
  for a, b in zip(
    jax.tree.leaves(nnx.state(model.backbone, nnx.Param)),
    jax.tree.leaves(nnx.state(eager.backbone, nnx.Param)),
  ):
    np.testing.assert_array_equal(a, b)
  summary, kept = evaluate_split(model, spec, str(delft_tiles), "val", keep=2)
  assert 0.0 <= summary["accuracy"] <= 1.0 and kept["pred"].shape == (2, 32, 32)
