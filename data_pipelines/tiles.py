"""Where tiles go: tile windows over a raster, spatial splits by blocks, few-label subsets.

Splits are drawn per block of `block_px` x `block_px` pixels, never per tile: a tile joins a split
only if every block it touches belongs to that split, so overlapping tiles (stride < size) never
share a pixel across train, val and test. Tiles that straddle two splits are dropped and counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = ("train", "val", "test")
FEW_LABEL_SIZES = (10, 50, 200, 450)  # the paper's Table 1


@dataclasses.dataclass(frozen=True)
class TileWindow:
  row: int
  col: int
  size: int


def tile_windows(height: int, width: int, size: int, stride: int) -> list[TileWindow]:
  """Row-major tile windows; the last row/column is shifted inward so the raster edge is covered."""
  if size > height or size > width:
    raise ValueError(f"raster of {height} x {width} px is smaller than one {size} px tile")
  if stride <= 0:
    raise ValueError(f"stride must be positive, got {stride}")

  def starts(n):
    s = list(range(0, n - size + 1, stride))
    if s[-1] != n - size:
      s.append(n - size)
    return s

  return [TileWindow(r, c, size) for r in starts(height) for c in starts(width)]


def assign_blocks(weights: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
  """Split index per block (index into SPLITS), drawn in a seeded order until each split holds
  its fraction of the total weight (e.g. labelled pixels); weightless blocks go to train."""
  if abs(sum(fractions.values()) - 1) > 1e-6 or set(fractions) != set(SPLITS):
    raise ValueError(f"split fractions must cover {SPLITS} and sum to 1, got {fractions}")
  out = np.zeros(weights.shape, np.int8)  # train
  flat = weights.ravel()
  order = [i for i in np.random.default_rng(seed).permutation(flat.size) if flat[i] > 0]
  total = flat.sum()
  assigned, i = 0.0, 0
  for split in ("test", "val"):  # smallest first so each gets at least one block when possible
    target = assigned + fractions[split] * total
    while i < len(order) and assigned < target and fractions[split] > 0:
      out.flat[order[i]] = SPLITS.index(split)
      assigned += flat[order[i]]
      i += 1
  return out


def assign_blocks_nested(
  inner: np.ndarray, outer: np.ndarray, fractions: dict[str, float], seed: int
) -> np.ndarray:
  """One split for two tile sets on one grid whose areas nest (e.g. two surveys of a place, one
  covering part of the other): blocks touching the inner area are drawn on the inner weights,
  the others on the outer weights, so each set gets its fractions and every block has one
  split in both."""
  if inner.shape != outer.shape:
    raise ValueError(f"weights of different block grids: {inner.shape} vs {outer.shape}")
  first = assign_blocks(inner, fractions, seed)
  rest = assign_blocks(np.where(inner > 0, 0, outer), fractions, seed)
  return np.where(inner > 0, first, rest).astype(np.int8)


def tile_split(window: TileWindow, block_split: np.ndarray, block_px: int) -> int | None:
  """The split of the blocks under a tile, or None if they disagree."""
  r0, c0 = window.row // block_px, window.col // block_px
  r1, c1 = (window.row + window.size - 1) // block_px, (window.col + window.size - 1) // block_px
  under = np.unique(block_split[r0 : r1 + 1, c0 : c1 + 1])
  return int(under[0]) if under.size == 1 else None


def few_label_subsets(
  train_ids: list[int], seed: int, sizes=FEW_LABEL_SIZES
) -> dict[str, list[int]]:
  """Nested seeded subsets of the training tiles (train_10 within train_50, ...); only sizes
  smaller than the training set (a subset as large as it is the training set itself)."""
  order = np.random.default_rng(seed).permutation(np.asarray(sorted(train_ids)))
  return {f"train_{n}": sorted(int(i) for i in order[:n]) for n in sizes if n < len(order)}
