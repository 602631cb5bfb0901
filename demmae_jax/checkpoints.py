"""MAE weights in and out: the official/timm, Hugging Face ViTMAE and our own orbax formats.

Every file is first read into one canonical form, a flat dict of NumPy arrays under the official
MAE (timm) key names in PyTorch layout. Hugging Face keys are renamed (and q/k/v fused) into it,
our orbax checkpoints are exported into it, and one table then maps it onto the Flax model:
strictly (every tensor present with the right shape, nothing left over), after optional
channel adaptation and position-embedding interpolation.

Reading never executes code from a file: PyTorch pickles go through `torch.load(weights_only=True)`
(torch is imported only when such a file is read), safetensors and orbax hold plain arrays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.atomic import atomic_dir
from demmae_jax.models.mae import PRESETS, MAEConfig, MaskedAutoencoder, preset

log = logging.getLogger(__name__)

FORMAT = "demmae_jax.mae/1"  # written into our config.json; how a directory is recognised
# (a file-format name, kept when the facade module became demmae_jax/api.py)
STATE_DIR = "state"
CHANNEL_ADAPT = ("sum", "mean", "repeat")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_HEAD_PREFIXES = ("head.", "fc_norm.")  # a finetuned classifier's extras
_DECODER_PREFIXES = ("decoder_", "mask_token")


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


# ====================================================================== reading files


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
  """Returns (tensors under the file's own key names, the Hugging Face config.json or None).

  `path`: a .pth/.pt/.bin/.ckpt (a bare state dict or the official {'model': state_dict}),
  a .safetensors file, or a Hugging Face directory (model.safetensors or pytorch_model.bin).
  """
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  if path.is_dir():
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (path / name).is_file():
        return read_state_dict(path / name)
      if (path / f"{name}.index.json").is_file():
        return _read_shards(path / f"{name}.index.json"), _read_hf_config(path / "config.json")
    raise CheckpointError(
      f"{path}: directory holds neither our checkpoint ({STATE_DIR}/ + "
      f"config.json) nor model.safetensors / pytorch_model.bin (or their "
      f".index.json shards)"
    )
  if path.suffix == ".safetensors":
    tensors = _read_safetensors(path)
  elif path.suffix in _TORCH_SUFFIXES:
    tensors = _read_torch(path)
  else:
    raise CheckpointError(
      f"{path}: unknown checkpoint type {path.suffix!r}; expected "
      f".safetensors, one of {_TORCH_SUFFIXES} or a directory"
    )
  return tensors, _read_hf_config(path.parent / "config.json")


def _read_shards(index: Path) -> dict[str, np.ndarray]:
  """A Hugging Face sharded checkpoint: the index maps each tensor to a shard file beside it."""
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index}: not a valid shard index: {e}") from e
  bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
  if bad:  # shards live beside the index; never follow a path elsewhere
    raise CheckpointError(f"{index}: shard names must be plain file names, got {bad[:3]}")
  tensors = {}
  for shard in shards:
    tensors.update(read_state_dict(index.parent / shard)[0])
  if set(tensors) != set(weight_map):
    raise CheckpointError(
      f"{index}: shards hold {len(tensors)} tensors, the index lists "
      f"{len(weight_map)}; missing from shards: "
      f"{_compact(sorted(set(weight_map) - set(tensors)))[:10]}"
    )
  return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), framework="numpy") as f:
      return {k: _float32(f.get_tensor(k)) for k in f.keys()}
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{path}: cannot read as safetensors (truncated or corrupt?): {e}") from e


def _read_torch(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
      f"{path}: reading a PyTorch file needs torch (pip install torch; the CPU "
      f"build is enough), or convert the file to .safetensors"
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
      f"{path}: refused: {_unpickling_reason(e)}. Only plain tensors are loaded "
      f"(torch.load(weights_only=True)); a file that asks to import or call anything else could "
      f"run code, or is not a PyTorch checkpoint at all"
    ) from e
  except Exception as e:  # torch raises RuntimeError, EOFError, ... for damaged files
    raise CheckpointError(
      f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): "
      f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    ) from e
  # The official MAE files wrap the state dict as {'model': state_dict, ...}.
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(
      f"{path}: holds no state dict (a mapping of names to tensors), got {type(obj).__name__}"
    )
  bad = sorted(
    repr(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
  )
  if bad:
    raise CheckpointError(
      f"{path}: entries that are not name -> tensor: {bad[:10]}; expected "
      f"a bare state dict or {{'model': state_dict}}"
    )
  return {
    k: _float32(v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy())
    for k, v in obj.items()
  }


def _unpickling_reason(e: Exception) -> str:
  # torch wraps the one useful line ("Trying to load unsupported GLOBAL posix.system ...") in
  # paragraphs of advice that suggest weights_only=False, which we never do.
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  useful = [
    line
    for line in lines
    if not line.startswith(("Weights only load failed", "Check the doc", "Please file an issue"))
  ]
  return (useful[0] if useful else lines[0] if lines else type(e).__name__).rstrip(".")


def _float32(x: np.ndarray) -> np.ndarray:
  return (
    np.asarray(x, np.float32)
    if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"
    else np.asarray(x)
  )


def _read_hf_config(path: Path) -> dict | None:
  if not path.is_file():
    return None
  try:
    cfg = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not valid JSON: {e}") from e
  return cfg if isinstance(cfg, dict) and cfg.get("model_type") == "vit_mae" else None


# ====================================================================== layouts → official names

# Hugging Face ViTMAE names → official names. Three spellings exist: the Hub files
# (`vit.encoder.layer.N.attention.attention.query`, `decoder.decoder_layers.N...`), transformers
# 5 in memory (`vit.layers.N.attention.q_proj`, `mlp.fc1`) and what transformers 5's
# save_pretrained writes back (Hub names, but the decoder as `decoder.decoder_encoder.layer.N`).
_HF_PREFIXES = [
  (r"^(?:vit\.)?embeddings\.cls_token$", "cls_token"),
  (r"^(?:vit\.)?embeddings\.position_embeddings$", "pos_embed"),
  (r"^(?:vit\.)?embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
  (r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
  (r"^(?:vit\.)?layernorm\.", "norm."),
  (r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.", r"decoder_blocks.\1."),
  (r"^decoder\.(decoder_embed|decoder_norm|decoder_pred)\.", r"\1."),
  (r"^decoder\.(mask_token|decoder_pos_embed)$", r"\1"),
]
_HF_BLOCK = [  # inside a block, after the prefix above
  (r"attention\.attention\.(query|key|value)\.", r"attn.\1."),
  (r"attention\.(q|k|v)_proj\.", lambda m: f"attn.{dict(q='query', k='key', v='value')[m[1]]}."),
  (r"attention\.(?:output\.dense|o_proj)\.", "attn.proj."),
  (r"layernorm_before\.", "norm1."),
  (r"layernorm_after\.", "norm2."),
  (r"(?:intermediate\.dense|mlp\.fc1)\.", "mlp.fc1."),
  (r"(?:output\.dense|mlp\.fc2)\.", "mlp.fc2."),
]


def detect_layout(keys) -> str:
  """'official' (the MAE repo / timm names) or 'hf' (Hugging Face ViTMAE)."""
  keys = set(keys)
  if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
    return "official"
  if any(re.match(r"^(vit\.)?embeddings\.", k) for k in keys):
    return "hf"
  raise CheckpointError(
    "neither official MAE (patch_embed.proj.weight, blocks.N...) nor Hugging "
    f"Face ViTMAE (vit.embeddings...) keys; first keys: {sorted(keys)[:8]}"
  )


def hf_to_official(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames Hugging Face ViTMAE keys to official ones and fuses q, k, v into qkv ([q; k; v]
  along the output axis, as timm's Attention reads it). Keys it does not know keep their
  name, so the strict check reports them as unexpected."""
  out, qkv = {}, {}
  for key, value in sd.items():
    new = key
    for pattern, repl in _HF_PREFIXES:
      new, n = re.subn(pattern, repl, key)
      if n:
        break
    m = re.match(r"^((?:decoder_)?blocks\.\d+\.)(.*)$", new)
    if m and new != key:
      for pattern, repl in _HF_BLOCK:
        inner, n = re.subn("^" + pattern, repl, m[2])
        if n:
          break
      else:  # unknown inside a block: report it under its own name
        out[key] = value
        continue
      new = m[1] + inner
      part = re.match(r"^attn\.(query|key|value)\.(weight|bias)$", inner)
      if part:
        qkv.setdefault((m[1], part[2]), {})[part[1]] = (key, value)
        continue
    out[new] = value
  for (block, kind), parts in qkv.items():
    if set(parts) == {"query", "key", "value"}:
      out[f"{block}attn.qkv.{kind}"] = np.concatenate(
        [parts[p][1] for p in ("query", "key", "value")], axis=0
      )
    else:  # incomplete: keep the pieces under their own names, qkv shows up as missing
      out.update({name: value for name, value in parts.values()})
  return out


# ====================================================================== official ↔ Flax table


@dataclasses.dataclass(frozen=True)
class _Entry:
  official: str  # e.g. 'blocks.3.attn.qkv.weight'
  flax: str  # path in nnx.to_pure_dict(nnx.state(model)), '/'-joined: 'blocks/attn/qkv/kernel'
  kind: str  # 'linear' ([out, in] ↔ [in, out]), 'conv' (OIHW ↔ HWIO) or 'same'
  layer: int | None = None  # index along the stacked blocks' leading layer axis (3 above)

  def to_flax(self, x: np.ndarray) -> np.ndarray:
    return {"linear": lambda: x.T, "conv": lambda: x.transpose(2, 3, 1, 0), "same": lambda: x}[
      self.kind
    ]()

  def to_official(self, x: np.ndarray) -> np.ndarray:
    return {"linear": lambda: x.T, "conv": lambda: x.transpose(3, 2, 0, 1), "same": lambda: x}[
      self.kind
    ]()


def _block_entries(official: str, flax: str, layer: int) -> list[_Entry]:
  """Block `layer`: official `{official}.{layer}.*`, the stacked Flax arrays `{flax}/*`[layer]."""
  e = []
  for norm in ("norm1", "norm2"):
    e += _norm_entries(f"{official}.{layer}.{norm}", f"{flax}/{norm}")
  for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
    e += _linear_entries(f"{official}.{layer}.{lin}", f"{flax}/{lin.replace('.', '/')}")
  return [dataclasses.replace(x, layer=layer) for x in e]


def _linear_entries(official: str, flax: str) -> list[_Entry]:
  return [
    _Entry(f"{official}.weight", f"{flax}/kernel", "linear"),
    _Entry(f"{official}.bias", f"{flax}/bias", "same"),
  ]


def _norm_entries(official: str, flax: str) -> list[_Entry]:
  return [
    _Entry(f"{official}.weight", f"{flax}/scale", "same"),
    _Entry(f"{official}.bias", f"{flax}/bias", "same"),
  ]


def param_table(config: MAEConfig) -> list[_Entry]:
  """Every tensor of the model: its official name, Flax path and layout change."""
  t = [
    _Entry("cls_token", "cls_token", "same"),
    _Entry("pos_embed", "pos_embed", "same"),
    _Entry("patch_embed.proj.weight", "patch_embed/proj/kernel", "conv"),
    _Entry("patch_embed.proj.bias", "patch_embed/proj/bias", "same"),
  ]
  for i in range(config.depth):
    t += _block_entries("blocks", "blocks", i)
  t += _norm_entries("norm", "norm")
  t += _linear_entries("decoder_embed", "decoder_embed")
  t += [
    _Entry("mask_token", "mask_token", "same"),
    _Entry("decoder_pos_embed", "decoder_pos_embed", "same"),
  ]
  for i in range(config.decoder_depth):
    t += _block_entries("decoder_blocks", "decoder_blocks", i)
  t += _norm_entries("decoder_norm", "decoder_norm")
  t += _linear_entries("decoder_pred", "decoder_pred")
  return t


def _is_decoder(key: str) -> bool:
  return key.startswith(_DECODER_PREFIXES)


def _flatten(tree, prefix="") -> dict[str, object]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
    return out
  return {prefix[:-1]: tree}


def to_official(model: MaskedAutoencoder) -> dict[str, np.ndarray]:
  """The model's tensors under official names in PyTorch layout (what `load_official` reads)."""
  return _pure_to_official(nnx.to_pure_dict(nnx.state(model)), model.config, "model")


def _pure_to_official(pure, config: MAEConfig, source: str) -> dict[str, np.ndarray]:
  # Checkpoints written before the blocks were stacked hold one array per block.
  flat = stack_layers(_flatten(pure), source)
  table = param_table(config)
  diff = compare_shapes({k: np.shape(v) for k, v in flat.items()}, expected_flax_shapes(config))
  if diff:
    raise CheckpointError(
      "\n".join(
        [f"{source}: state does not match its config.json; variable paths:"] + diff.lines("state")
      )
    )
  return {e.official: e.to_official(_layer(np.asarray(flat[e.flax]), e)) for e in table}


def _layer(x: np.ndarray, e: _Entry) -> np.ndarray:
  return x if e.layer is None else x[e.layer]


# Per-layer paths of blocks as our checkpoints held them before the blocks were stacked:
# '[prefix/]blocks/3/attn/qkv/kernel' (or decoder_blocks), stacked as '[prefix/]blocks/attn/...'.
_PER_LAYER = re.compile(r"^((?:.*/)?(?:decoder_)?blocks)/(\d+)/(.+)$")


def is_per_layer(path: str) -> bool:
  """Whether `path` names one block's array in the layout before the blocks were stacked."""
  return bool(_PER_LAYER.match(path))


def layer_groups(paths, source: str = "checkpoint") -> dict[str, list[str]]:
  """{stacked path: [its per-layer paths in layer order]} for the per-layer block paths among
  `paths` (other paths are left out); a group whose layers are not 0..n-1 is a CheckpointError."""
  found: dict[str, dict[int, str]] = {}
  for p in paths:
    m = _PER_LAYER.match(p)
    if m:
      found.setdefault(f"{m[1]}/{m[3]}", {})[int(m[2])] = p
  groups = {}
  for stacked, layers in sorted(found.items()):
    if sorted(layers) != list(range(len(layers))):
      raise CheckpointError(
        f"{source}: {stacked}: per-layer arrays of layers {sorted(layers)}; expected "
        f"every layer 0..{max(layers)}"
      )
    groups[stacked] = [layers[i] for i in range(len(layers))]
  return groups


def stacked_shapes(shapes: Mapping[str, tuple], source: str = "checkpoint") -> dict[str, tuple]:
  """Array shapes by path with per-layer block paths replaced by their stacked path and shape
  ([n_layers, *shape]); layers of one array that differ in shape are a CheckpointError."""
  groups = layer_groups(shapes, source)
  out = {k: tuple(v) for k, v in shapes.items() if not _PER_LAYER.match(k)}
  for stacked, paths in groups.items():
    kinds = {tuple(shapes[p]) for p in paths}
    if len(kinds) != 1:
      raise CheckpointError(
        f"{source}: {stacked}: the layers have different shapes {sorted(kinds)}; cannot stack them"
      )
    out[stacked] = (len(paths),) + kinds.pop()
  return out


def stack_layers(flat: Mapping[str, object], source: str = "checkpoint") -> dict[str, object]:
  """Per-layer block arrays ('blocks/3/attn/qkv/kernel') stacked along a leading layer axis into
  the layout the model stores ('blocks/attn/qkv/kernel'); other arrays unchanged."""
  groups = layer_groups(flat, source)
  stacked_shapes({k: np.shape(v) for k, v in flat.items()}, source)  # same shape per layer
  out = {k: v for k, v in flat.items() if not _PER_LAYER.match(k)}
  for stacked, paths in groups.items():
    out[stacked] = np.stack([np.asarray(flat[p]) for p in paths])
  return out


# ====================================================================== architecture


def infer_architecture(
  sd: Mapping[str, np.ndarray], hf_config: dict | None = None, source: str = "checkpoint"
) -> dict:
  """MAEConfig fields read off tensor shapes (and the Hugging Face config.json when there is one);
  head counts, which shapes do not show, come from config.json or the preset of that width."""
  f = {}
  w = sd.get("patch_embed.proj.weight")
  if w is not None and w.ndim == 4:
    f.update(embed_dim=w.shape[0], in_chans=w.shape[1], patch_size=w.shape[-1])
  f["depth"] = _count(sd, "blocks")
  fc1 = sd.get("blocks.0.mlp.fc1.weight")
  if fc1 is not None and fc1.ndim == 2:
    f["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
  pos = sd.get("pos_embed")
  if pos is not None and "patch_size" in f:
    f["img_size"] = _grid(pos, "pos_embed", source) * f["patch_size"]
  dec = sd.get("decoder_embed.weight")
  if dec is not None and dec.ndim == 2:
    f["decoder_embed_dim"] = dec.shape[0]
    f["decoder_depth"] = _count(sd, "decoder_blocks")
  if hf_config:
    for hf, ours in (
      ("num_attention_heads", "num_heads"),
      ("decoder_num_attention_heads", "decoder_num_heads"),
      ("mask_ratio", "mask_ratio"),
      ("norm_pix_loss", "norm_pix_loss"),
    ):
      if hf in hf_config:
        f[ours] = hf_config[hf]
    if hf_config.get("hidden_act", "gelu") != "gelu" or not hf_config.get("qkv_bias", True):
      raise CheckpointError(
        f"{source}: config.json asks for hidden_act="
        f"{hf_config.get('hidden_act')!r}, qkv_bias={hf_config.get('qkv_bias')}"
        f"; this model has exact gelu and qkv biases"
      )
    if not math.isclose(hf_config.get("layer_norm_eps", 1e-6), 1e-6):
      log.warning(
        "%s: config.json has layer_norm_eps=%s, this model uses 1e-6 (as the official "
        "MAE); outputs differ slightly",
        source,
        hf_config["layer_norm_eps"],
      )
  for width, heads, field in (
    ("embed_dim", "num_heads", "embed_dim"),
    ("decoder_embed_dim", "decoder_num_heads", "decoder_embed_dim"),
  ):
    if width in f and heads not in f:
      known = {getattr(p, field): getattr(p, heads) for p in PRESETS.values()}
      if f[width] in known:
        f[heads] = known[f[width]]
  return f


def _count(sd, prefix: str) -> int:
  ids = {int(m[1]) for k in sd if (m := re.match(rf"^{prefix}\.(\d+)\.", k))}
  return max(ids) + 1 if ids else 0


def _grid(table: np.ndarray, name: str, source: str) -> int:
  n = table.shape[1] - 1 if table.ndim == 3 else -1  # the cls row comes first
  g = math.isqrt(max(n, 0))
  if n < 0 or g * g != n:
    raise CheckpointError(f"{source}: {name} of shape {table.shape} is not [1, 1 + g*g, D]")
  return g


def resolve_config(
  sd, hf_config, config: MAEConfig | str | None, overrides: dict, source: str
) -> MAEConfig:
  """The architecture to build: `config` (a preset name or MAEConfig) if given, else read off the
  checkpoint; `overrides` on top. A checkpoint that disagrees is refused later by the strict
  check, except img_size (interpolated) and in_chans (with channel_adapt)."""
  if config is None:
    inferred = infer_architecture(sd, hf_config, source)
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
      if width in inferred and heads not in inferred and heads not in overrides:
        raise CheckpointError(
          f"{source}: cannot tell the number of attention heads of "
          f"{width}={inferred[width]} from tensor shapes; pass {heads}=..."
        )
    config = MAEConfig().replace(**inferred)
  elif isinstance(config, str):
    config = preset(config)
  return config.replace(**overrides)


# ====================================================================== adaptation


def adapt_channels(
  sd: dict[str, np.ndarray], in_chans: int, mode: str | None, source: str
) -> dict[str, np.ndarray]:
  """RGB weights for a single-channel DEM. 'sum' adds the patch kernel over input channels (the
  same as feeding the DEM repeated to every channel), 'mean' averages it; the pixel predictor
  then predicts the mean of its per-channel outputs. 'repeat' keeps the weights: the model keeps
  the checkpoint's channels and the caller repeats the DEM."""
  if mode is not None and mode not in CHANNEL_ADAPT:
    raise CheckpointError(f"channel_adapt must be one of {CHANNEL_ADAPT} or None, got {mode!r}")
  w = sd.get("patch_embed.proj.weight")
  if mode is None or w is None or w.ndim != 4:
    return sd
  have = w.shape[1]
  if mode == "repeat":
    if in_chans != have:
      raise CheckpointError(
        f"{source}: channel_adapt='repeat' keeps the checkpoint's {have} "
        f"input channels (repeat the DEM to {have} channels yourself); "
        f"in_chans={in_chans} contradicts it"
      )
    return sd
  if in_chans != 1:
    raise CheckpointError(
      f"{source}: channel_adapt={mode!r} reduces the {have}-channel patch "
      f"kernel to 1 channel; in_chans must be 1, got {in_chans}"
    )
  if have == 1:
    return sd
  sd = dict(sd)
  sd["patch_embed.proj.weight"] = getattr(w, mode)(axis=1, keepdims=True)
  log.info("%s: patch embedding %d -> 1 input channel by %s", source, have, mode)
  if "decoder_pred.weight" in sd:
    pw, pb = sd["decoder_pred.weight"], sd["decoder_pred.bias"]
    if pw.ndim == 2 and pw.shape[0] % have == 0 and pb.shape == pw.shape[:1]:
      # Rows are ordered (p, q, c) as patchify: average the channel outputs of each pixel.
      sd["decoder_pred.weight"] = pw.reshape(-1, have, pw.shape[1]).mean(1)
      sd["decoder_pred.bias"] = pb.reshape(-1, have).mean(1)
  return sd


def resize_pos_embed(table: np.ndarray, grid: int, name: str, source: str) -> np.ndarray:
  """[1, 1 + g*g, D] → [1, 1 + grid*grid, D]: bicubic over the patch grid, the cls row kept."""
  g = _grid(table, name, source)
  if g == grid:
    return table
  d = table.shape[-1]
  patch = jax.image.resize(
    jnp.asarray(table[0, 1:].reshape(g, g, d)), (grid, grid, d), method="bicubic"
  )
  log.info(
    "%s: %s interpolated (bicubic) from a %dx%d to a %dx%d grid", source, name, g, g, grid, grid
  )
  return np.concatenate(
    [table[:, :1], np.asarray(patch, np.float32).reshape(1, grid * grid, d)], axis=1
  )


# ====================================================================== strict load


def expected_flax_shapes(config: MAEConfig) -> dict[str, tuple]:
  """Flax path → shape of every array of the model for `config` (blocks stacked)."""
  abstract = nnx.eval_shape(lambda: MaskedAutoencoder(config, rngs=nnx.Rngs(params=0)))
  return {k: tuple(v.shape) for k, v in _flatten(nnx.to_pure_dict(nnx.state(abstract))).items()}


def expected_shapes(config: MAEConfig, encoder_only: bool = False) -> dict[str, tuple]:
  """Official name → PyTorch-layout shape of every tensor the model for `config` loads."""
  flat = expected_flax_shapes(config)
  return {
    e.official: e.to_official(_layer(np.empty(flat[e.flax], np.bool_), e)).shape
    for e in param_table(config)
    if not (encoder_only and _is_decoder(e.official))
  }


def check_official(
  sd: Mapping[str, np.ndarray],
  config: MAEConfig,
  *,
  source: str = "checkpoint",
  encoder_only: bool = False,
) -> None:
  """Every expected tensor present with the right shape and nothing left over, or one
  CheckpointError listing all that is missing, unexpected and mis-shaped."""
  diff = compare_shapes({k: v.shape for k, v in sd.items()}, expected_shapes(config, encoder_only))
  if diff:
    raise CheckpointError(_mismatch_message(source, config, diff, encoder_only))


def load_official(
  model: MaskedAutoencoder,
  sd: Mapping[str, np.ndarray],
  *,
  source: str = "checkpoint",
  encoder_only: bool = False,
) -> None:
  """Copies official-named tensors into `model` after `check_official`. With `encoder_only` the
  decoder keeps its initialisation (and `sd` must hold no decoder tensors)."""
  check_official(sd, model.config, source=source, encoder_only=encoder_only)
  values, layers = {}, {}
  for e in param_table(model.config):
    if e.official in sd:
      x = e.to_flax(np.asarray(sd[e.official], np.float32))
      if e.layer is None:
        values[e.flax] = jnp.asarray(x)
      else:  # stacked on load: layer i of the Flax array is official block i
        layers.setdefault(e.flax, {})[e.layer] = x
  values.update(
    {k: jnp.asarray(np.stack([v[i] for i in range(len(v))])) for k, v in layers.items()}
  )
  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  # An abstract model (from_pretrained skips initialisation) must get every tensor.
  uncovered = [
    k for k, v in _flatten(pure).items() if k not in values and isinstance(v, jax.ShapeDtypeStruct)
  ]
  if uncovered:
    raise CheckpointError(f"{source}: model tensors with no official name: {uncovered}")
  _assign(pure, values)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def _assign(tree, values: dict[str, object], prefix="") -> None:
  for k in tree:
    path = f"{prefix}{k}"
    if isinstance(tree[k], Mapping):
      _assign(tree[k], values, path + "/")
    elif path in values:
      tree[k] = values[path]


@dataclasses.dataclass(frozen=True)
class ShapeDiff:
  """What a set of saved arrays lacks, adds and shapes otherwise than a model wants (by name)."""

  missing: list[str]
  unexpected: list[str]
  misshaped: dict[str, tuple[tuple, tuple]]  # name -> (saved shape, model shape)

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.misshaped)

  def lines(self, saved: str = "file") -> list[str]:
    """The differences, indented, with runs of numbered names compacted ('blocks.{0..3}.x') and
    mis-shaped names grouped by their pair of shapes; `saved` names the saved side."""
    out = [
      f"  {what} ({len(keys)}): {', '.join(_compact(keys))}"
      for what, keys in (("missing", self.missing), ("unexpected", self.unexpected))
      if keys
    ]
    if self.misshaped:
      by_shapes: dict[tuple, list[str]] = {}
      for k, shapes in self.misshaped.items():
        by_shapes.setdefault(shapes, []).append(k)
      out.append(f"  mis-shaped ({len(self.misshaped)}):")
      out += [
        f"    {', '.join(_compact(keys))}: {saved} {got} vs model {want}"
        for (got, want), keys in sorted(by_shapes.items(), key=lambda kv: sorted(kv[1]))
      ]
    return out


def compare_shapes(saved: Mapping[str, tuple], want: Mapping[str, tuple]) -> ShapeDiff:
  """Saved array shapes against the model's, by name (the weight port's official names, or a
  training checkpoint's variable paths)."""
  return ShapeDiff(
    sorted(set(want) - set(saved)),
    sorted(set(saved) - set(want)),
    {
      k: (tuple(saved[k]), tuple(want[k]))
      for k in set(want) & set(saved)
      if tuple(saved[k]) != tuple(want[k])
    },
  )


def _mismatch_message(source, config, diff: ShapeDiff, encoder_only) -> str:
  lines = [
    f"{source}: checkpoint does not match the model (embed_dim={config.embed_dim}, "
    f"depth={config.depth}, patch_size={config.patch_size}, in_chans={config.in_chans}, "
    f"decoder_embed_dim={config.decoder_embed_dim}, decoder_depth={config.decoder_depth}, "
    f"mlp_ratio={config.mlp_ratio}); official MAE key names:"
  ] + diff.lines()
  missing, unexpected, misshaped = diff.missing, diff.unexpected, diff.misshaped
  if not encoder_only and missing and all(_is_decoder(k) for k in missing):
    lines.append(
      "  the file has no decoder (like mae_pretrain_vit_*.pth): pass "
      "encoder_only=True (--encoder-only) to initialise the decoder"
    )
  if any(k.startswith(_HEAD_PREFIXES) for k in unexpected):
    lines.append(
      "  head/fc_norm belong to a finetuned classifier: pass drop_head=True "
      "(--drop-head) to skip them"
    )
  got, want = misshaped.get("patch_embed.proj.weight", ((), ()))
  if (
    got
    and len(got) == len(want) == 4
    and got[1] != want[1]
    and got[:1] + got[2:] == want[:1] + want[2:]
  ):
    lines.append(
      "  for a 1-channel DEM from RGB weights pass channel_adapt='sum' or 'mean' "
      "(or 'repeat' and feed 3 channels)"
    )
  return "\n".join(lines)


def _compact(keys) -> list[str]:
  """['blocks.0.x', 'blocks.1.x', 'blocks.2.x'] → ['blocks.{0..2}.x']: readable lists of
  what is missing from a 24-block model."""
  groups: dict[tuple[str, str], list[int]] = {}
  out = []
  for k in keys:
    m = re.match(r"^(.*?[./])(\d+)([./].*)$", k)
    if m:
      groups.setdefault((m[1], m[3]), []).append(int(m[2]))
    else:
      out.append(k)
  for (head, tail), ids in groups.items():
    ids = sorted(ids)
    if len(ids) == 1:
      out.append(f"{head}{ids[0]}{tail}")
    elif ids == list(range(ids[0], ids[-1] + 1)):
      out.append(f"{head}{{{ids[0]}..{ids[-1]}}}{tail}")
    else:
      out.append(f"{head}{{{','.join(map(str, ids))}}}{tail}")
  return sorted(out)


# ====================================================================== our format


def is_own_checkpoint(path: str | os.PathLike) -> bool:
  cfg = Path(path) / "config.json"
  if not (Path(path).is_dir() and cfg.is_file()):
    return False
  try:
    return json.loads(cfg.read_text()).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def save_model(
  model: MaskedAutoencoder, dst: str | os.PathLike, *, overwrite: bool = False
) -> Path:
  """Writes `dst/` = orbax `state/` + `config.json`, atomically: everything goes to a temporary
  sibling directory renamed into place at the end, so `dst` is either absent, the old checkpoint
  or the complete new one. An existing `dst` is refused unless overwrite=True."""
  dst = Path(dst).absolute()  # orbax wants absolute paths
  with atomic_dir(dst, overwrite=overwrite) as tmp:
    with _checkpointer() as ckptr:
      ckptr.save(tmp / STATE_DIR, nnx.to_pure_dict(nnx.state(model)))
    _write_config(tmp / "config.json", model.config)
  return dst


def _checkpointer():
  # Synchronous: save_model returns only once every byte is written, before the rename.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _write_config(path: Path, config: MAEConfig) -> None:
  meta = {"format": FORMAT, "config": dataclasses.asdict(config)}
  path.write_text(json.dumps(meta, indent=2) + "\n")


def read_own(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], MAEConfig]:
  """Our checkpoint as (official-named tensors, its MAEConfig)."""
  path = Path(path).absolute()
  try:
    meta = json.loads((path / "config.json").read_text())
    config = MAEConfig().replace(**meta["config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path / 'config.json'}: not a valid {FORMAT} config: {e}") from e
  try:
    with _checkpointer() as ckptr:
      pure = ckptr.restore(path / STATE_DIR)
  except Exception as e:  # orbax raises many types; name the file whatever it was
    raise CheckpointError(
      f"{path / STATE_DIR}: cannot restore the orbax state (truncated or corrupt?): {e}"
    ) from e
  return _pure_to_official(pure, config, str(path)), config


# ====================================================================== entry point


def from_pretrained(
  path: str | os.PathLike,
  *,
  config: MAEConfig | str | None = None,
  encoder_only: bool = False,
  channel_adapt: str | None = None,
  drop_head: bool = False,
  seed: int = 0,
  **overrides,
) -> MaskedAutoencoder:
  """A MaskedAutoencoder with the weights of `path`, in any supported layout (see module doc).

  config: architecture to build (preset name or MAEConfig); default: read off the checkpoint
    (our config.json, or tensor shapes + Hugging Face config.json). `overrides` apply on top:
    img_size=... interpolates position embeddings, in_chans=1 needs channel_adapt.
  encoder_only: initialise the decoder (seeded by `seed`) instead of loading it; decoder
    tensors in the file are then ignored.
  channel_adapt: 'sum' | 'mean' | 'repeat' for DEMs with RGB weights (see `adapt_channels`).
  drop_head: skip a finetuned classifier's `head.*` / `fc_norm.*`.
  """
  source = str(path)
  if is_own_checkpoint(path):
    sd, saved = read_own(path)
    config = saved if config is None else config
    hf_config = None
  else:
    raw, hf_config = read_state_dict(path)
    try:
      layout = detect_layout(raw)
    except CheckpointError as e:
      raise CheckpointError(f"{source}: {e}") from None
    sd = hf_to_official(raw) if layout == "hf" else raw
    log.info("%s: %s layout, %d tensors", source, layout, len(sd))
  cfg = resolve_config(sd, hf_config, config, overrides, source)
  if drop_head:
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
  if encoder_only:
    dropped = [k for k in sd if _is_decoder(k)]
    sd = {k: v for k, v in sd.items() if not _is_decoder(k)}
    log.warning(
      "%s: encoder only: the decoder is freshly initialised (seed=%d)%s",
      source,
      seed,
      f"; {len(dropped)} decoder tensors in the file ignored" if dropped else "",
    )
  sd = adapt_channels(sd, cfg.in_chans, channel_adapt, source)
  for name, width in (("pos_embed", cfg.embed_dim), ("decoder_pos_embed", cfg.decoder_embed_dim)):
    if name in sd and sd[name].ndim == 3 and sd[name].shape[-1] == width:
      sd[name] = resize_pos_embed(sd[name], cfg.grid_size, name, source)
  # Shapes first: a wrong file fails before any real (slow, for ViT-H) initialisation.
  check_official(sd, cfg, source=source, encoder_only=encoder_only)
  if encoder_only:
    model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(params=seed))
  else:  # every tensor comes from the file: skip the random initialisation
    model = nnx.eval_shape(lambda: MaskedAutoencoder(cfg, rngs=nnx.Rngs(params=seed)))
  load_official(model, sd, source=source, encoder_only=encoder_only)
  return model
