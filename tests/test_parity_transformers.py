"""Numerical parity with PyTorch: Hugging Face `ViTMAEForPreTraining` under random weights.

One random HF model is written in each layout the loader reads (save_pretrained safetensors, the
Hub's key names in pytorch_model.bin, transformers-5 in-memory names, the official MAE
{'model': state_dict} .pth with and without decoder), loaded with `api.from_pretrained`, and run
on the same images and masking noise. Block outputs, encoder output, decoder prediction, loss,
mask and every parameter gradient must agree to 1e-4 (float32).

`python tests/test_parity_transformers.py` prints the measured errors (docs/checkpoints.md).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # test-only dependencies (requirements-test.txt)
import transformers
from flax import nnx

from demmae_jax import api

ATOL = 1e-4
LAYERS = (0, 1, 2, 3)


def hf_model(in_chans: int, norm_pix_loss: bool, seed: int = 0):
  """The `tiny` preset as a ViTMAE (official LayerNorm eps and exact gelu), every tensor random:
  weights ~ 1/sqrt(fan_in), norm scales ~ 1, biases, tokens and position tables ~ 0.1."""
  config = transformers.ViTMAEConfig(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=32,
    patch_size=4,
    num_channels=in_chans,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=128,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    mask_ratio=0.75,
    norm_pix_loss=norm_pix_loss,
  )
  model = transformers.ViTMAEForPreTraining(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = p[0].numel() ** -0.5 if p.ndim >= 2 and name.endswith("weight") else 0.1
      p.copy_(
        torch.randn(p.shape, generator=gen) * std
        + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
      )
  return model


def official_from_hf(hf, get=lambda p: p) -> dict:
  """The official MAE state dict, written from the HF modules (not from key strings, so it checks
  the loader's renaming instead of repeating it). `get` picks the value or its .grad."""
  sd = {}

  def put(name, module):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = get(module.weight), get(module.bias)

  def block(prefix, layer):
    a = layer.attention
    put(f"{prefix}.norm1", layer.layernorm_before)
    put(f"{prefix}.norm2", layer.layernorm_after)
    sd[f"{prefix}.attn.qkv.weight"] = torch.cat(
      [get(a.q_proj.weight), get(a.k_proj.weight), get(a.v_proj.weight)]
    )
    sd[f"{prefix}.attn.qkv.bias"] = torch.cat(
      [get(a.q_proj.bias), get(a.k_proj.bias), get(a.v_proj.bias)]
    )
    put(f"{prefix}.attn.proj", a.o_proj)
    put(f"{prefix}.mlp.fc1", layer.mlp.fc1)
    put(f"{prefix}.mlp.fc2", layer.mlp.fc2)

  emb, dec = hf.vit.embeddings, hf.decoder
  sd["cls_token"], sd["pos_embed"] = get(emb.cls_token), get(emb.position_embeddings)
  put("patch_embed.proj", emb.patch_embeddings.projection)
  for i, layer in enumerate(hf.vit.layers):
    block(f"blocks.{i}", layer)
  put("norm", hf.vit.layernorm)
  put("decoder_embed", dec.decoder_embed)
  sd["mask_token"], sd["decoder_pos_embed"] = get(dec.mask_token), get(dec.decoder_pos_embed)
  for i, layer in enumerate(dec.decoder_layers):
    block(f"decoder_blocks.{i}", layer)
  put("decoder_norm", dec.decoder_norm)
  put("decoder_pred", dec.decoder_pred)
  return sd


def write(hf, layout: str, root: Path, encoder_only: bool = False) -> Path:
  """Writes `hf` in `layout` under `root`; returns what to pass to from_pretrained."""
  if layout == "hf_safetensors":
    hf.save_pretrained(root / "hf")
    return root / "hf"
  if layout == "hf_hub_bin":  # Hub names: vit.encoder.layer.N..., decoder.decoder_layers.N...
    hf.save_pretrained(root / "saved")
    from safetensors.torch import load_file

    sd = {
      k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
      for k, v in load_file(root / "saved" / "model.safetensors").items()
    }
    assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in sd)
    (root / "hub").mkdir()
    torch.save(sd, root / "hub" / "pytorch_model.bin")
    shutil.copy(root / "saved" / "config.json", root / "hub" / "config.json")
    return root / "hub"
  if layout == "hf_v5_bin":  # transformers 5 in-memory names, bare, no config.json
    torch.save(hf.state_dict(), root / "vit_mae_v5.bin")
    return root / "vit_mae_v5.bin"
  sd = {k: v.detach().clone() for k, v in official_from_hf(hf).items()}
  if encoder_only:  # as mae_pretrain_vit_base.pth
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
  torch.save({"model": sd}, root / "mae_official.pth")
  return root / "mae_official.pth"


forward = nnx.jit(lambda m, x, n: m(x, noise=n))
latent = nnx.jit(lambda m, x, n: m.forward_encoder(x, n)[0])
encode = nnx.jit(lambda m, x: m.encode(x, LAYERS))
loss_and_grads = nnx.jit(lambda m, x, n: nnx.value_and_grad(lambda m: m(x, noise=n)[0])(m))


def inputs(in_chans: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, 32, 32, in_chans)).astype(np.float32)  # NHWC
  noise = rng.uniform(size=(2, 64)).astype(np.float32)
  nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  return images, noise, nchw, torch.from_numpy(noise)


def err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b.detach(), np.float64))))


def forward_errors(layout: str, in_chans: int, norm_pix_loss: bool, root: Path) -> dict:
  hf = hf_model(in_chans, norm_pix_loss)
  path = write(hf, layout, root)
  # Files without a config.json do not say which loss they were trained with.
  model = api.from_pretrained(
    path,
    **(
      {} if layout.startswith("hf_") and layout != "hf_v5_bin" else {"norm_pix_loss": norm_pix_loss}
    ),
  )
  assert model.config.norm_pix_loss == norm_pix_loss and model.config.in_chans == in_chans
  images, noise, x, n = inputs(in_chans)
  loss, pred, mask = forward(model, images, noise)
  with torch.no_grad():
    out = hf(pixel_values=x, noise=n)
    enc = hf.vit(pixel_values=x, noise=n)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())
  return {
    "loss": err(loss, out.loss),
    "logits": err(pred, out.logits),
    "last_hidden_state": err(latent(model, images, noise), enc.last_hidden_state),
  }


def encode_errors(layout: str, in_chans: int, root: Path) -> dict:
  hf = hf_model(in_chans, False)
  model = api.from_pretrained(write(hf, layout, root, encoder_only=True), encoder_only=True)
  images, _, x, _ = inputs(in_chans)
  hf.config.mask_ratio = 0.0  # keep every patch, in order: HF's blocks then see what encode sees
  with torch.no_grad():
    out = hf.vit(pixel_values=x, noise=torch.arange(64.0).expand(2, 64), output_hidden_states=True)
  assert len(out.hidden_states) == 1 + len(LAYERS)  # [embeddings, block 0, ..., block 3]
  return {
    f"block {i}": err(f, out.hidden_states[i + 1]) for i, f in zip(LAYERS, encode(model, images))
  }


def gradient_errors(in_chans: int, norm_pix_loss: bool, root: Path) -> dict:
  hf = hf_model(in_chans, norm_pix_loss)
  model = api.from_pretrained(write(hf, "official_pth", root), norm_pix_loss=norm_pix_loss)
  images, noise, x, n = inputs(in_chans)
  loss, grads = loss_and_grads(model, images, noise)
  hf(pixel_values=x, noise=n).loss.backward()
  # Gradients in official layout: the same transposes as the weights.
  holder = nnx.clone(model)
  nnx.update(holder, grads)
  ours = api.to_official(holder)
  theirs = official_from_hf(hf, get=lambda p: p.grad)
  fixed = {"pos_embed", "decoder_pos_embed"}  # sin-cos tables, not trained on either side
  assert all(theirs[k] is None for k in fixed)
  assert all(
    theirs[k] is not None and float(theirs[k].abs().max()) > 0 for k in theirs if k not in fixed
  )
  return {k: err(ours[k], theirs[k]) for k in theirs if k not in fixed}


CASES = [
  (layout, c, npl)
  for layout in ("hf_safetensors", "official_pth")
  for c in (1, 3)
  for npl in (False, True)
] + [("hf_hub_bin", 3, False), ("hf_v5_bin", 1, True)]


@pytest.mark.slow
@pytest.mark.parametrize("layout,in_chans,norm_pix_loss", CASES)
def test_loss_logits_mask_and_encoder_output_match_transformers(
  layout, in_chans, norm_pix_loss, tmp_path
):
  errors = forward_errors(layout, in_chans, norm_pix_loss, tmp_path)
  assert max(errors.values()) <= ATOL, errors


@pytest.mark.slow
@pytest.mark.parametrize(
  "layout,in_chans", [("official_pth", 1), ("official_pth", 3), ("hf_safetensors", 1)]
)
def test_encode_block_outputs_match_transformers_hidden_states(layout, in_chans, tmp_path):
  errors = encode_errors(layout, in_chans, tmp_path)
  assert max(errors.values()) <= ATOL, errors


@pytest.mark.slow
@pytest.mark.parametrize("in_chans,norm_pix_loss", [(1, True), (3, False)])
def test_every_parameter_gradient_matches_torch_autograd(in_chans, norm_pix_loss, tmp_path):
  errors = gradient_errors(in_chans, norm_pix_loss, tmp_path)
  assert len(errors) == 86 - 2
  assert max(errors.values()) <= ATOL, {k: v for k, v in errors.items() if v > ATOL}


def test_hf_directory_config_supplies_heads_and_loss(tmp_path):
  hf = hf_model(1, True)
  hf.config.num_attention_heads = 2  # shapes cannot show this; config.json must
  model = api.from_pretrained(write(hf, "hf_safetensors", tmp_path))
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_attention_heads"] == 2
  assert (model.config.num_heads, model.config.norm_pix_loss, model.config.in_chans) == (2, True, 1)


def test_hf_config_that_the_model_cannot_honour_is_refused_or_warned(tmp_path, caplog):
  hf = hf_model(3, False)
  hf.config.layer_norm_eps = 1e-12  # the HF default; the official MAE uses 1e-6
  with caplog.at_level("WARNING"):
    api.from_pretrained(write(hf, "hf_safetensors", tmp_path))
  assert "layer_norm_eps=1e-12" in caplog.text
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
  with pytest.raises(api.CheckpointError, match="hf: config.json asks for hidden_act='relu'"):
    api.from_pretrained(tmp_path / "hf")


def test_hf_file_with_a_missing_or_unknown_tensor_is_refused_in_its_own_names(tmp_path):
  sd = hf_model(3, False).state_dict()
  del sd["vit.layers.1.attention.k_proj.bias"]
  sd["vit.layers.0.attention.rotary.weight"] = torch.zeros(3)
  torch.save(sd, tmp_path / "pytorch_model.bin")
  with pytest.raises(api.CheckpointError) as e:
    api.from_pretrained(tmp_path / "pytorch_model.bin")
  msg = str(e.value)
  assert "pytorch_model.bin" in msg and "missing (1): blocks.1.attn.qkv.bias" in msg
  assert (
    "unexpected (3): vit.layers.0.attention.rotary.weight, "
    "vit.layers.1.attention.q_proj.bias, vit.layers.1.attention.v_proj.bias"
  ) in msg


def _print_report():
  import tempfile

  rows = []
  with tempfile.TemporaryDirectory() as d:
    fresh = lambda: Path(tempfile.mkdtemp(dir=d))  # one directory per case
    for layout, c, npl in CASES:
      rows += [
        (f"forward {layout} in_chans={c} norm_pix_loss={npl}", k, v)
        for k, v in forward_errors(layout, c, npl, fresh()).items()
      ]
    for layout, c in (("official_pth", 1), ("official_pth", 3), ("hf_safetensors", 1)):
      rows += [
        (f"encode {layout} (encoder only) in_chans={c}", k, v)
        for k, v in encode_errors(layout, c, fresh()).items()
      ]
    for c, npl in ((1, True), (3, False)):
      g = gradient_errors(c, npl, fresh())
      worst = max(g, key=g.get)
      rows.append(
        (
          f"gradients in_chans={c} norm_pix_loss={npl}",
          f"all {len(g)} params (worst {worst})",
          g[worst],
        )
      )
  print("| case | quantity | max abs error |\n|---|---|---|")
  for case, q, v in rows:
    print(f"| {case} | {q} | {v:.2e} |")


if __name__ == "__main__":
  sys.exit(_print_report())


def test_gelu_matches_torch_exact_gelu_and_its_gradient():
  import jax

  from demmae_jax.models import vit

  x = np.random.default_rng(0).normal(scale=4.0, size=20000).astype(np.float32)
  xt = torch.tensor(x, requires_grad=True)
  ref = torch.nn.functional.gelu(xt)
  ref.sum().backward()
  np.testing.assert_allclose(np.asarray(vit.gelu(x)), ref.detach().numpy(), atol=2e-6, rtol=1e-6)
  grad = jax.grad(lambda v: vit.gelu(v).sum())(x)
  np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), atol=2e-6, rtol=1e-6)
