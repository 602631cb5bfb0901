"""Normalisation modes for elevation tiles, written once in TensorFlow ops.

The tf.data reader calls `normalise` on batched tensors; the predictor on large rasters calls
`normalise_numpy`, which runs the very same function on NumPy arrays (no second definition).

Modes (each returns values for valid pixels; invalid pixels are set to 0):
- "minmax":   per-tile (x - min) / (max - min) over valid pixels, in [0, 1] (the paper's).
- "zscore":   (x - mean) / std with the training set's global statistics from the manifest.
- "relative": (x - p_low) / scale_m, clipped to [0, 1]: height above the tile's `low_percentile`
              in units of a fixed `scale_m` metres, so a 3 m step means the same in every tile
              (the percentile is taken on a regular subgrid of <= 4096 pixels, see below).
- "ndsm":     the nDSM channel (height above ground) / scale_m, clipped to [0, 1].
`channels` = 1 keeps one channel, 3 repeats it (the backbone's RGB-shaped input).
Several modes joined by "+" (e.g. "relative+ndsm") stack one channel per mode, in that order;
`channels` is then the number of modes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MODES = ("minmax", "zscore", "relative", "ndsm")


def parse_mode(mode: str) -> tuple[str, ...]:
  """ "relative+ndsm" -> ("relative", "ndsm"); each part must be one of MODES, none twice."""
  parts = tuple(str(mode).split("+"))
  bad = [m for m in parts if m not in MODES]
  if bad or len(set(parts)) != len(parts):
    raise ValueError(
      f"unknown or repeated normalisation mode {mode!r}; one of {MODES}, or several joined by '+'"
    )
  return parts


def mode_channels(mode: str, channels: int = 1) -> int:
  """The number of input channels a normalisation gives."""
  parts = parse_mode(mode)
  return channels if len(parts) == 1 else len(parts)


PERCENTILE_SAMPLE = 4096  # pixels per tile the percentile is taken over


def _masked_percentile(x: tf.Tensor, valid: tf.Tensor, q: float) -> tf.Tensor:
  """Per-tile q-th percentile ("lower", no interpolation) over the valid pixels of a regular
  subgrid of at most PERCENTILE_SAMPLE pixels (every s-th row and column): [B,H,W] -> [B].

  Exact selection, not a sort: the rank k = floor(q/100 (n_valid - 1)) is below
  k_max = floor(q/100 (n - 1)) + 1 for n subgrid pixels, so the value is the k-th of the k_max
  smallest, which `top_k` of the negated values finds (63 of 3,136 at 224 px and q = 2: ~7x less
  CPU than sorting all of them). Invalid pixels are +inf, last in either order; the result equals
  the sort's for every input without NaN (tests/test_data_normalisation.py)."""
  flat, k, n = _subgrid_ranks(x, valid, q)
  k_max = min(n, int(np.floor(np.float32(q / 100.0) * np.float32(n - 1))) + 1)
  smallest = -tf.math.top_k(-flat, k_max, sorted=True).values  # ascending
  return tf.gather(smallest, tf.minimum(k, k_max - 1)[:, None], batch_dims=1)[:, 0]


def _subgrid_ranks(x: tf.Tensor, valid: tf.Tensor, q: float) -> tuple[tf.Tensor, tf.Tensor, int]:
  """(the subgrid's values with invalid pixels +inf [B, n], the percentile's rank per tile [B],
  n) for `_masked_percentile` and its sorting reference."""
  h, w = x.shape[1], x.shape[2]
  s = max(1, int(np.ceil(np.sqrt(h * w / PERCENTILE_SAMPLE))))
  x, valid = x[:, ::s, ::s], valid[:, ::s, ::s]
  n = int(np.ceil(h / s)) * int(np.ceil(w / s))
  flat = tf.reshape(tf.where(valid, x, np.inf), [tf.shape(x)[0], n])
  n_valid = tf.reduce_sum(tf.cast(tf.reshape(valid, tf.shape(flat)), tf.int32), axis=1)
  k = tf.cast(tf.floor(q / 100.0 * tf.cast(tf.maximum(n_valid - 1, 0), tf.float32)), tf.int32)
  return flat, k, n


def sorted_percentile(x: tf.Tensor, valid: tf.Tensor, q: float) -> tf.Tensor:
  """`_masked_percentile` by a full sort of the subgrid, as it was taken before the top_k
  selection: the reference the selection is tested (tests/test_data_normalisation.py) and
  benchmarked (benchmarks/corpus_reader_throughput.py, mode relative_sort) against."""
  flat, k, _ = _subgrid_ranks(x, valid, q)
  return tf.gather(tf.sort(flat, axis=1), k[:, None], batch_dims=1)[:, 0]


def normalise(
  elevation,
  valid,
  mode: str = "minmax",
  *,
  stats: dict | None = None,
  ndsm=None,
  scale_m: float = 30.0,
  low_percentile: float = 2.0,
  channels: int = 1,
  filled: bool = False,
) -> tf.Tensor:
  """[B, H, W] elevation (m) and validity -> float32 [B, H, W, channels].

  `filled=True` promises that invalid pixels hold their tile's lowest valid value (as the tile
  writer stores them): minmax and relative then give 0 there without masking, which saves passes
  over the batch; the result is the same (tested).
  """
  parts = parse_mode(mode)
  if len(parts) > 1:
    if channels != len(parts):
      raise ValueError(f"normalisation {mode!r} gives {len(parts)} channels, not {channels}")
    return tf.concat(
      [
        normalise(
          elevation,
          valid,
          m,
          stats=stats,
          ndsm=ndsm,
          scale_m=scale_m,
          low_percentile=low_percentile,
          filled=filled,
        )
        for m in parts
      ],
      -1,
    )
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  x = tf.cast(elevation, tf.float32)
  valid = tf.cast(valid, tf.bool)
  if mode == "minmax":
    lo = tf.reduce_min(x if filled else tf.where(valid, x, np.inf), axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(x if filled else tf.where(valid, x, -np.inf), axis=[1, 2], keepdims=True)
    out = (x - lo) * tf.math.reciprocal_no_nan(hi - lo)  # flat tile -> 0
  elif mode == "zscore":
    if not stats or "mean" not in stats or "std" not in stats:
      raise ValueError(
        "zscore needs stats={'mean': ..., 'std': ...} (manifest['stats']['elevation'])"
      )
    out = (x - stats["mean"]) / max(float(stats["std"]), 1e-6)
  elif mode == "relative":
    lo = _masked_percentile(x, valid, low_percentile)[:, None, None]
    out = tf.clip_by_value((x - lo) / scale_m, 0.0, 1.0)
  else:  # ndsm
    if ndsm is None:
      raise ValueError("ndsm mode needs the tiles' 'ndsm' channel (prepare tiles with extras ndsm)")
    out = tf.clip_by_value(tf.cast(ndsm, tf.float32) / scale_m, 0.0, 1.0)
  if not (filled and mode in ("minmax", "relative")):  # filled: already 0 at invalid pixels
    out = tf.where(valid, out, 0.0)
  out = out[..., None]
  return tf.repeat(out, channels, axis=-1) if channels == 3 else out


def normalise_numpy(
  elevation: np.ndarray, valid: np.ndarray | None = None, mode: str = "minmax", **kwargs
) -> np.ndarray:
  """`normalise` on NumPy arrays ([H, W] or [B, H, W]); returns float32 [..., channels]."""
  elevation = np.asarray(elevation, np.float32)
  single = elevation.ndim == 2
  if valid is None:
    valid = np.isfinite(elevation)
  valid = np.asarray(valid, bool) & np.isfinite(elevation)
  elevation = np.where(valid, elevation, 0.0)  # NaN would poison min/max even when masked
  if kwargs.get("ndsm") is not None:
    ndsm = np.asarray(kwargs["ndsm"], np.float32)
    kwargs["ndsm"] = (
      np.where(np.isfinite(ndsm), ndsm, 0.0)[None]
      if single
      else np.where(np.isfinite(ndsm), ndsm, 0.0)
    )
  if single:
    elevation, valid = elevation[None], valid[None]
  out = normalise(elevation, valid, mode, **kwargs).numpy()
  return out[0] if single else out
