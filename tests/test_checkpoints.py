"""Loading and saving weights: our orbax format, the official/timm layout, strictness, safety.

Parity with PyTorch (Hugging Face ViTMAE) is in test_parity_transformers.py; here the reference
is the model's own tensors, exported with `api.to_official` and written the way the official
repo, timm and our converter write them.
"""

import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test-only dependency (requirements-test.txt): writes the .pth files read here
from flax import nnx

from demmae_jax import api, checkpoints
from test_train_support import per_layer_tree

REPO = Path(__file__).resolve().parents[1]
CFG = api.preset("tiny")


def random_sd(config=CFG, seed=0):
  """Official-named tensors, all random, so a tensor landing in the wrong place or orientation
  changes the outputs; scaled like a trained net (weights ~ 1/sqrt(fan_in), norm scales ~ 1) so
  activations stay O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in checkpoints.expected_shapes(config).items():
    std = 1 / np.sqrt(np.prod(shape[1:])) if len(shape) >= 2 and k.endswith(".weight") else 0.1
    scale = bool(re.search(r"norm\d?\.weight$", k))
    out[k] = (rng.normal(0, std, shape) + scale).astype(np.float32)
  return out


def to_torch(sd):
  return {k: torch.from_numpy(v) for k, v in sd.items()}


def assert_holds(model, sd):
  got = api.to_official(model)
  assert got.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(got[k], np.asarray(sd[k]), err_msg=k)


forward = nnx.jit(lambda model, images, noise: model(images, noise=noise))
encode = nnx.jit(
  lambda model, images, layers: model.encode(images, layers), static_argnames="layers"
)


def images_and_noise(config, n=2):
  images = jax.random.normal(
    jax.random.key(1), (n, config.img_size, config.img_size, config.in_chans)
  )
  return images, jax.random.uniform(jax.random.key(2), (n, config.num_patches))


@pytest.fixture(scope="module")
def sd():
  return random_sd(seed=1)


@pytest.fixture()
def rgb_pth(sd, tmp_path):
  """The official mae_visualize layout: {'model': state_dict} with the decoder."""
  path = tmp_path / "mae_visualize_vit_tiny.pth"
  torch.save({"model": to_torch(sd)}, path)
  return path


@pytest.fixture(scope="module")
def tiny(sd, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "a.pth"
  torch.save({"model": to_torch(sd)}, path)
  return api.from_pretrained(path)


# ------------------------------------------------------------------ our orbax format


def test_save_model_then_from_pretrained_is_bit_identical(tiny, sd, tmp_path):
  dst = api.save_model(tiny, tmp_path / "ckpt")
  assert sorted(p.name for p in dst.iterdir()) == ["config.json", "state"]
  assert json.loads((dst / "config.json").read_text())["config"]["embed_dim"] == 64
  back = api.from_pretrained(dst)
  assert back.config == tiny.config
  assert_holds(back, sd)
  images, noise = images_and_noise(tiny.config)
  for a, b in zip(forward(tiny, images, noise), forward(back, images, noise)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_model_refuses_existing_dst_and_overwrite_replaces_it(tiny, sd, tmp_path):
  dst = api.save_model(tiny, tmp_path / "ckpt")
  other_sd = random_sd(seed=7)
  torch.save(to_torch(other_sd), tmp_path / "other.pth")
  other = api.from_pretrained(tmp_path / "other.pth")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    api.save_model(other, dst)
  assert_holds(api.from_pretrained(dst), sd)  # untouched
  api.save_model(other, dst, overwrite=True)
  assert_holds(api.from_pretrained(dst), other_sd)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other.pth"]  # no temp dirs


def test_failed_save_leaves_earlier_checkpoint_intact_and_no_partial_dir(
  tiny, sd, tmp_path, monkeypatch
):
  dst = api.save_model(tiny, tmp_path / "ckpt")

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoints, "_write_config", broken)  # fails after the state is written
  with pytest.raises(OSError, match="disk full"):
    api.save_model(tiny, dst, overwrite=True)
  with pytest.raises(OSError, match="disk full"):
    api.save_model(tiny, tmp_path / "new")
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert_holds(api.from_pretrained(dst), sd)
  # The last step of an overwrite (new into place) failing puts the earlier one back.
  rename = os.replace

  def failing_swap(src, target):
    if Path(target) == dst and str(src).endswith(".tmp"):
      raise OSError("rename failed")
    return rename(src, target)

  monkeypatch.setattr(os, "replace", failing_swap)
  with pytest.raises(OSError, match="rename failed"):
    api.save_model(tiny, dst, overwrite=True)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert_holds(api.from_pretrained(dst), sd)


def _write_per_layer(model, dst: Path, edit=None) -> Path:
  """`model` saved as checkpoints were before the blocks were stacked: one array per block
  ('blocks/3/attn/qkv/kernel'), orbax state/ + config.json."""
  pure = per_layer_tree(nnx.to_pure_dict(nnx.state(model)), edit)
  dst.mkdir()
  with checkpoints._checkpointer() as ckptr:
    ckptr.save(dst.absolute() / "state", pure)
  checkpoints._write_config(dst / "config.json", model.config)
  return dst


def test_checkpoint_saved_with_one_array_per_block_loads_stacked(tiny, sd, tmp_path):
  old = _write_per_layer(tiny, tmp_path / "old")
  back = api.from_pretrained(old)
  assert back.blocks.attn.qkv.kernel[...].shape == (4, 64, 192)
  assert_holds(back, sd)
  images, noise = images_and_noise(tiny.config)
  for a, b in zip(forward(tiny, images, noise), forward(back, images, noise)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  "edit,match",
  [
    (
      lambda f: f.update({"blocks/2/mlp/fc1/kernel": np.zeros((64, 32), np.float32)}),
      r"old: blocks/mlp/fc1/kernel: the layers have different shapes \[\(64, 32\), \(64, 256\)\]",
    ),
    (
      lambda f: f.pop("blocks/1/norm1/scale"),
      r"old: blocks/norm1/scale: per-layer arrays of layers \[0, 2, 3\]; expected every layer 0..3",
    ),
    (
      lambda f: f.update(
        {k: np.zeros((64, 384), np.float32) for k in list(f) if k.endswith("attn/qkv/kernel")}
      ),
      r"(?s)old: state does not match its config.json.*blocks/attn/qkv/kernel: state "
      r"\(4, 64, 384\) vs model \(4, 64, 192\)",
    ),
  ],
)
def test_per_layer_checkpoint_with_wrong_shapes_is_a_clear_error(tiny, tmp_path, edit, match):
  old = _write_per_layer(tiny, tmp_path / "old", edit)
  with pytest.raises(api.CheckpointError, match=match):
    api.from_pretrained(old)


def test_own_checkpoint_with_bad_config_names_the_file(tiny, tmp_path):
  dst = api.save_model(tiny, tmp_path / "ckpt")
  meta = json.loads((dst / "config.json").read_text())
  meta["config"]["embed_dims"] = 64  # a typo'd field
  (dst / "config.json").write_text(json.dumps(meta))
  with pytest.raises(api.CheckpointError, match=r"ckpt/config.json.*embed_dims"):
    api.from_pretrained(dst)


def test_damaged_own_checkpoint_names_the_state_dir(tiny, tmp_path):
  dst = api.save_model(tiny, tmp_path / "ckpt")
  for f in (dst / "state").rglob("*"):
    if f.is_file() and f.name != "_CHECKPOINT_METADATA":
      f.write_bytes(b"")
  with pytest.raises(api.CheckpointError, match=r"ckpt/state: cannot restore"):
    api.from_pretrained(dst)


# ------------------------------------------------------------------ official and timm layouts


def test_official_wrapped_and_timm_bare_state_dicts_load_bit_identically(sd, rgb_pth, tmp_path):
  torch.save(to_torch(sd), tmp_path / "timm.bin")
  for path in (rgb_pth, tmp_path / "timm.bin"):
    back = api.from_pretrained(path)
    assert back.config == CFG  # architecture read off the shapes (heads from the preset)
    assert_holds(back, sd)


def test_sharded_safetensors_directory_loads_and_shards_stay_beside_the_index(sd, tmp_path):
  from safetensors.numpy import save_file

  names = sorted(sd)
  shards = {
    "model-00001-of-00002.safetensors": names[:40],
    "model-00002-of-00002.safetensors": names[40:],
  }
  for shard, keys in shards.items():
    save_file({k: sd[k] for k in keys}, tmp_path / shard)
  index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  assert_holds(api.from_pretrained(tmp_path), sd)
  index["weight_map"][names[0]] = "../elsewhere.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(api.CheckpointError, match="index.json: shard names must be plain"):
    api.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32(sd, tmp_path, dtype):
  half = {k: v.to(dtype) for k, v in to_torch(sd).items()}
  torch.save({"model": half}, tmp_path / "half.pth")
  model = api.from_pretrained(tmp_path / "half.pth")
  assert model.blocks.attn.qkv.kernel[...].dtype == jnp.float32
  assert_holds(model, {k: v.float().numpy() for k, v in half.items()})


def test_official_names_and_torch_layouts(tiny):
  sd = api.to_official(tiny)
  assert {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "blocks.3.attn.qkv.weight",
    "blocks.3.mlp.fc2.bias",
    "norm.weight",
    "mask_token",
    "decoder_pos_embed",
    "decoder_embed.weight",
    "decoder_blocks.1.norm2.bias",
    "decoder_norm.bias",
    "decoder_pred.weight",
  } <= set(sd)
  assert len(sd) == 4 + 4 * 12 + 2 + 4 + 2 * 12 + 2 + 2
  assert sd["blocks.0.attn.qkv.weight"].shape == (192, 64)  # Linear [out, in]
  assert sd["patch_embed.proj.weight"].shape == (64, 3, 4, 4)  # conv OIHW
  assert tiny.blocks.attn.qkv.kernel[...].shape == (4, 64, 192)  # stacked: [layer, in, out]
  for i in (0, 3):
    np.testing.assert_array_equal(
      sd[f"blocks.{i}.attn.qkv.weight"].T, np.asarray(tiny.blocks.attn.qkv.kernel[...][i])
    )
  np.testing.assert_array_equal(
    sd["decoder_blocks.1.mlp.fc1.weight"].T, np.asarray(tiny.decoder_blocks.mlp.fc1.kernel[...][1])
  )
  np.testing.assert_array_equal(
    sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    np.asarray(tiny.patch_embed.proj.kernel[...]),
  )


def test_missing_unexpected_and_misshaped_keys_are_one_error_naming_the_file(sd, tmp_path):
  bad = to_torch(sd)
  del bad["blocks.1.mlp.fc2.bias"]
  bad["blocks.9.attn.qkv.weight"] = torch.zeros(192, 64)
  bad["decoder_pred.bias"] = torch.zeros(47)
  path = tmp_path / "broken.pth"
  torch.save({"model": bad}, path)
  with pytest.raises(api.CheckpointError) as e:
    api.from_pretrained(path, config="tiny")
  msg = str(e.value)
  assert str(path) in msg
  assert "missing (1): blocks.1.mlp.fc2.bias" in msg
  assert "unexpected (1): blocks.9.attn.qkv.weight" in msg
  assert "decoder_pred.bias: file (47,) vs model (48,)" in msg


def test_wider_or_deeper_checkpoint_is_refused_by_a_smaller_model(tmp_path):
  torch.save(to_torch(random_sd(CFG.replace(embed_dim=128))), tmp_path / "wide.pth")
  with pytest.raises(api.CheckpointError) as e:
    api.from_pretrained(tmp_path / "wide.pth", config="tiny")
  assert "blocks.{0..3}.attn.qkv.weight: file (384, 128) vs model (192, 64)" in str(e.value)
  torch.save(to_torch(random_sd(CFG.replace(depth=6))), tmp_path / "deep.pth")
  with pytest.raises(api.CheckpointError, match=r"unexpected \(24\): blocks\.\{4\.\.5\}\.attn"):
    api.from_pretrained(tmp_path / "deep.pth", config="tiny")


def test_finetuned_head_is_unexpected_unless_dropped(sd, tmp_path):
  ft = to_torch(sd)
  ft["head.weight"], ft["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
  torch.save({"model": ft}, tmp_path / "ft.pth")
  with pytest.raises(
    api.CheckpointError,
    match=r"(?s)unexpected \(2\): head.bias, head.weight.*"
    r"drop_head=True",
  ):
    api.from_pretrained(tmp_path / "ft.pth")
  assert_holds(api.from_pretrained(tmp_path / "ft.pth", drop_head=True), sd)


@pytest.mark.slow  # builds (initialises) real models
def test_encoder_only_file_needs_the_flag_and_then_initialises_the_decoder(sd, tmp_path, caplog):
  enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
  torch.save({"model": to_torch(enc)}, tmp_path / "mae_pretrain_vit_tiny.pth")
  with pytest.raises(api.CheckpointError, match="(?s)missing.*decoder_pred.*encoder_only=True"):
    api.from_pretrained(tmp_path / "mae_pretrain_vit_tiny.pth", config="tiny")
  with caplog.at_level(logging.WARNING):
    model = api.from_pretrained(
      tmp_path / "mae_pretrain_vit_tiny.pth", config="tiny", encoder_only=True, seed=5
    )
  assert "decoder is freshly initialised" in caplog.text
  fresh = api.to_official(api.build("tiny", seed=5))
  assert_holds(model, {k: enc.get(k, fresh[k]) for k in fresh})


def test_heads_that_shapes_cannot_show_must_be_given(tmp_path):
  torch.save(to_torch(random_sd(CFG.replace(embed_dim=80, num_heads=5))), tmp_path / "w80.pth")
  with pytest.raises(
    api.CheckpointError, match="w80.pth: cannot tell .* embed_dim=80.* pass num_heads="
  ):
    api.from_pretrained(tmp_path / "w80.pth")


def test_unknown_layout_and_unknown_file_type_are_clear_errors(tmp_path):
  from safetensors.numpy import save_file

  save_file({"foo.weight": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
  with pytest.raises(api.CheckpointError, match=r"x\.safetensors: neither official"):
    api.from_pretrained(tmp_path / "x.safetensors")
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(api.CheckpointError, match=r"w\.npz: unknown checkpoint type"):
    api.from_pretrained(tmp_path / "w.npz")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(sd, tmp_path, suffix):
  path = tmp_path / f"cut{suffix}"
  if suffix == ".pth":
    torch.save({"model": to_torch(sd)}, path)
  else:
    from safetensors.numpy import save_file

    save_file(sd, path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(api.CheckpointError, match=rf"cut\{suffix}: cannot read .*truncated"):
    api.from_pretrained(path)


# ------------------------------------------------------------------ safety


class _Payload:
  """Unpickling this calls os.system: what a malicious checkpoint does."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(sd, tmp_path, how):
  target = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  payload = {"extra": _Payload(target), "model": to_torch(sd)}
  if how == "torch.save":
    torch.save(payload, path)
  else:
    path.write_bytes(pickle.dumps(payload, protocol=2))
  with pytest.raises(api.CheckpointError, match=r"evil\.pth: refused: .*(system|GLOBAL)"):
    api.from_pretrained(path)
  assert not target.exists()


def test_reading_pth_without_torch_says_what_to_install(rgb_pth, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(
    api.CheckpointError,
    match=r"vit_tiny\.pth: reading a PyTorch file needs "
    r"torch",
  ):
    api.from_pretrained(rgb_pth)


# ------------------------------------------------------------------ DEM adaptation


@pytest.mark.slow  # compiles forward passes of three models
def test_channel_sum_equals_feeding_the_dem_repeated_to_rgb(tiny, rgb_pth):
  dem_model = api.from_pretrained(rgb_pth, in_chans=1, channel_adapt="sum")
  mean_model = api.from_pretrained(rgb_pth, in_chans=1, channel_adapt="mean")
  dem = jax.random.normal(jax.random.key(3), (2, 32, 32, 1))
  rgb = jnp.repeat(dem, 3, axis=-1)
  for a, b in zip(encode(dem_model, dem, (0, 3)), encode(tiny, rgb, (0, 3))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  for a, b in zip(encode(mean_model, dem, (0, 3)), encode(tiny, rgb / 3, (0, 3))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  # The 1-channel prediction is the mean of the 3 channel predictions.
  noise = jax.random.uniform(jax.random.key(4), (2, 64))
  _, pred1, _ = forward(dem_model, dem, noise)
  _, pred3, _ = forward(tiny, rgb, noise)
  np.testing.assert_allclose(
    np.asarray(pred1), np.asarray(pred3).reshape(2, 64, 16, 3).mean(-1), atol=1e-4
  )


def test_channel_mismatch_without_adaptation_or_with_repeat_is_refused(rgb_pth):
  with pytest.raises(
    api.CheckpointError,
    match="(?s)patch_embed.proj.weight: file .64, 3, 4, 4. "
    "vs model .64, 1, 4, 4.*channel_adapt='sum'",
  ):
    api.from_pretrained(rgb_pth, in_chans=1)
  with pytest.raises(api.CheckpointError, match="repeat.*keeps the checkpoint's 3"):
    api.from_pretrained(rgb_pth, in_chans=1, channel_adapt="repeat")
  assert api.from_pretrained(rgb_pth, channel_adapt="repeat").config.in_chans == 3


def test_position_tables_are_interpolated_bicubically_on_the_patch_grid(sd, tmp_path):
  # Channel 0 ramps along h, channel 1 along w: a transposed grid would swap them.
  h, w = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
  table = np.zeros((1, 65, 64), np.float32)
  table[0, 0] = 5.0
  table[0, 1:, 0], table[0, 1:, 1] = h.reshape(-1), w.reshape(-1)
  torch.save({"model": to_torch({**sd, "pos_embed": table})}, tmp_path / "a.pth")
  model = api.from_pretrained(tmp_path / "a.pth", img_size=64)  # 8x8 -> 16x16 patches
  got = np.asarray(model.pos_embed[...])
  assert got.shape == (1, 257, 64) and model.decoder_pos_embed[...].shape == (1, 257, 32)
  np.testing.assert_array_equal(got[0, 0], table[0, 0])  # cls row kept
  grid = got[0, 1:].reshape(16, 16, 64)
  np.testing.assert_allclose(grid[..., 0], grid[:, :1, 0].repeat(16, 1), atol=1e-6)  # h only
  np.testing.assert_allclose(grid[..., 1], grid[:1, :, 1].repeat(16, 0), atol=1e-6)  # w only
  expected = jax.image.resize(jnp.asarray(h), (16, 16), "bicubic")
  np.testing.assert_allclose(grid[..., 0], np.asarray(expected), atol=1e-5)
  assert grid[0, 0, 0] < grid[7, 0, 0] < grid[15, 0, 0]


# ------------------------------------------------------------------ converter


def test_convert_weights_output_loads_back_bit_identically(rgb_pth, tmp_path):
  sys.path.insert(0, str(REPO / "scripts"))
  try:
    import convert_weights
  finally:
    sys.path.pop(0)
  args = ["--in-chans", "1", "--channel-adapt", "mean", "--img-size", "48"]
  assert convert_weights.main([str(rgb_pth), str(tmp_path / "out")] + args) == 0
  direct = api.from_pretrained(rgb_pth, in_chans=1, channel_adapt="mean", img_size=48)
  converted = api.from_pretrained(tmp_path / "out")
  assert converted.config == direct.config and converted.config.img_size == 48
  assert_holds(converted, api.to_official(direct))
  # A second run does not destroy the first output.
  assert convert_weights.main([str(rgb_pth), str(tmp_path / "out")]) == 2
  assert_holds(api.from_pretrained(tmp_path / "out"), api.to_official(direct))


def test_convert_weights_help_describes_the_flags():
  out = subprocess.run(
    [sys.executable, str(REPO / "scripts" / "convert_weights.py"), "--help"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  for flag in ("--in-chans", "--channel-adapt", "--encoder-only", "--img-size", "--overwrite"):
    assert flag in out
