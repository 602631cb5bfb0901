"""Seeded random corruption of real files through the readers: every outcome must be the file
read, or a DataError naming it with nothing left behind; anything else (another exception, a
crash, a hang) is a bug. tests/test_bad_inputs.py runs a few seeds of each in CI; this runs many
and prints the tally per format and kind of damage.

  nice -n 15 .venv/bin/python benchmarks/fuzz_readers.py --seeds 200

Files: the first 30,000 points of the real delft/ahn3_cropped_2.laz (a LAZ written by laspy),
the real alexandria/dsm.tif (GeoTIFF), and the TFRecord tile shards of a 256 x 256 crop of it.
Damage (seeded): 8 random bytes anywhere, 4 random bytes in the first 2 KiB (header), 64 random
bytes at a random place, or truncation at a random length. Readers: data_pipelines.lidar.
las_to_rasters; data_pipelines.tile_writer.write_tiles; `prepare_data.py check`'s check_tile_set
and the training reader make_dataset (which must never read what check passed as bad).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("bytes", "header", "chunk", "truncated")


def corrupt(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  b = bytearray(raw)
  kind = KINDS[int(rng.integers(4))]
  if kind == "bytes":
    for i in rng.integers(0, len(b), 8):
      b[i] = int(rng.integers(256))
  elif kind == "header":
    for i in rng.integers(0, min(len(b), 2048), 4):
      b[i] = int(rng.integers(256))
  elif kind == "chunk":
    i = int(rng.integers(0, len(b) - 64))
    b[i : i + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
  else:
    b = b[: int(rng.integers(1, len(b)))]
  return bytes(b), kind


def small_real_laz(folder: Path) -> Path:
  """The first 30,000 points of delft/ahn3_cropped_2.laz as a LAZ of their own."""
  import laspy

  from data_pipelines.shared_data import shared_file

  out = Path(folder) / "delft_30k.laz"
  with laspy.open(shared_file("delft/ahn3_cropped_2.laz")) as reader:
    points = next(reader.chunk_iterator(30_000))
    header = laspy.LasHeader(point_format=reader.header.point_format, version=reader.header.version)
    header.offsets, header.scales = reader.header.offsets, reader.header.scales
  las = laspy.LasData(header)
  las.points = points.copy()
  las.write(str(out))
  return out


def real_tiles(folder: Path) -> Path:
  """Tile shards (16 tiles each) of a 256 x 256 crop of the real Alexandria DSM."""
  import rasterio
  from rasterio.windows import Window

  from data_pipelines.shared_data import shared_file
  from data_pipelines.tile_writer import write_tiles

  folder = Path(folder)
  with rasterio.open(shared_file("alexandria/dsm.tif")) as src:
    win = Window(0, 0, 256, 256)
    profile = dict(src.profile, width=256, height=256, transform=src.window_transform(win))
    data = src.read(1, window=win)
  with rasterio.open(folder / "crop.tif", "w", **profile) as dst:
    dst.write(data, 1)
  return write_tiles(
    folder / "crop.tif",
    folder / "t",
    tile_size=32,
    min_valid=0.5,
    progress=False,
    tiles_per_shard=16,
    dtype="float16",
  )


def _refused(e, path: Path, folder: Path, allowed: set[str]) -> str:
  assert str(e).startswith(str(path)), f"the error does not name {path}: {e}"
  left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
  assert set(left) <= allowed, f"left behind: {left}"
  return "refused"


def fuzz_laz(seed: int, laz: Path, folder: Path) -> tuple[str, str]:
  """('read' | 'refused', damage kind) for one seeded corruption of `laz` through las_to_rasters."""
  from data_pipelines.errors import DataError
  from data_pipelines.lidar import las_to_rasters

  folder.mkdir(parents=True, exist_ok=True)
  data, kind = corrupt(laz.read_bytes(), np.random.default_rng(seed))
  bad = folder / "fuzzed.laz"
  bad.write_bytes(data)
  try:
    las_to_rasters([bad], folder / "r", cell_size=1.0, crs="EPSG:28992", progress=False)
    return "read", kind
  except DataError as e:
    return _refused(e, bad, folder, {"fuzzed.laz"}), kind


def fuzz_geotiff(seed: int, tif: Path, folder: Path) -> tuple[str, str]:
  """One seeded corruption of `tif` through write_tiles; what is tiled must be terrain."""
  from data_pipelines.errors import DataError
  from data_pipelines.tile_writer import write_tiles

  folder.mkdir(parents=True, exist_ok=True)
  data, kind = corrupt(Path(tif).read_bytes(), np.random.default_rng(seed))
  bad = folder / "fuzzed.tif"
  bad.write_bytes(data)
  try:
    m = write_tiles(bad, folder / "t", tile_size=32, min_valid=0.5, progress=False)
  except DataError as e:
    return _refused(e, bad, folder, {"fuzzed.tif"}), kind
  stats = json.loads(m.read_text())["stats"]["elevation"]
  assert -1500 <= stats["min"] <= stats["max"] <= 10000, stats
  return "read", kind


def fuzz_tfrecord(seed: int, manifest: Path, folder: Path) -> tuple[str, str]:
  """One seeded corruption of one shard of a copy of the tile set, through check_tile_set and
  make_dataset: check must never pass what the reader then fails on."""
  from data_pipelines.errors import DataError
  from data_pipelines.reader import check_tile_set, make_dataset

  shutil.copytree(Path(manifest).parent, folder / "t")
  manifest = folder / "t" / "manifest.json"
  m = json.loads(manifest.read_text())
  rng = np.random.default_rng(seed)
  files = [f for s in m["splits"].values() for f in s["files"]]
  shard = manifest.parent / files[int(rng.integers(len(files)))]
  data, kind = corrupt(shard.read_bytes(), rng)
  shard.write_bytes(data)
  split = next(s for s, v in m["splits"].items() if shard.name in v["files"])
  outcomes = []
  for read in (
    lambda: check_tile_set(str(manifest)),
    lambda: list(
      make_dataset(
        str(manifest),
        split,
        global_batch_size=4,
        process_index=0,
        process_count=1,
        repeat=False,
        drop_remainder=False,
      )
    ),
  ):
    try:
      read()
      outcomes.append("read")
    except DataError as e:
      assert str(e).startswith(str(shard)), e
      outcomes.append("refused")
  assert outcomes[0] == "refused" or outcomes == ["read", "read"], outcomes
  return outcomes[0], kind


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--seeds", type=int, default=200)
  a = p.parse_args()
  from data_pipelines.shared_data import shared_file

  base = Path(tempfile.mkdtemp(prefix="fuzz_readers_"))
  laz, manifest = small_real_laz(base), real_tiles(base)
  tif = shared_file("alexandria/dsm.tif")
  runs = {
    "LAZ (delft, 30k points)": lambda s, f: fuzz_laz(s, laz, f),
    "GeoTIFF (alexandria dsm)": lambda s, f: fuzz_geotiff(s, tif, f),
    "TFRecord (tile shard)": lambda s, f: fuzz_tfrecord(s, manifest, f),
  }
  rows = [
    "| file | seeds | read | refused (DataError naming it) | other (bugs) | by damage: read / refused |",
    "|---|---|---|---|---|---|",
  ]
  for name, fn in runs.items():
    tally, bugs, t0 = {}, [], time.time()
    for seed in range(a.seeds):
      folder = base / f"{name[:3]}_{seed}"
      try:
        outcome, kind = fn(seed, folder)
        tally[(outcome, kind)] = tally.get((outcome, kind), 0) + 1
      except Exception as e:  # noqa: BLE001 - the tally's point
        bugs.append(f"seed {seed}: {e.__class__.__name__}: {e}")
      shutil.rmtree(folder, ignore_errors=True)
    read = sum(v for (o, _), v in tally.items() if o == "read")
    refused = sum(v for (o, _), v in tally.items() if o == "refused")
    by_kind = ", ".join(
      f"{k} {tally.get(('read', k), 0)} / {tally.get(('refused', k), 0)}" for k in KINDS
    )
    rows.append(f"| {name} | {a.seeds} | {read} | {refused} | {len(bugs)} | {by_kind} |")
    print(f"{name}: {time.time() - t0:.0f} s; " + ("; ".join(bugs) or "no bug"), flush=True)
  shutil.rmtree(base, ignore_errors=True)
  print("\n".join(rows))


if __name__ == "__main__":
  main()
