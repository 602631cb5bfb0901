"""Peak memory and throughput of sliding-window prediction against the raster's size: memory must
stay flat.

  .venv/bin/python benchmarks/predict_memory.py --sizes 5000 10000

For each size N, an N x N float32 GeoTIFF (tiled, deflate) is made by mirroring the real Delft
DSM (delft/ahn3_cropped_*.laz rasterised at 0.5 m through data_pipelines.lidar) and predicted
by `demmae_jax.inference.raster.predict_raster` in a fresh process with a tiny network (random
weights: memory does not depend on them). Each child reports its peak resident set size (ru_maxrss)
after warm-up (imports, model, one compiled batch) and after the whole prediction. Printed: both
figures, the prediction's own growth, the time, the throughput (windows/s and km^2/s at the
raster's 0.5 m cells), the ratio of peaks between sizes (1.0 = flat), and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CELL_M = 0.5  # the Delft DSM's cells


def delft_dsm(folder: Path) -> Path:
  from data_pipelines.lidar import las_to_rasters
  from data_pipelines.prepare import DELFT_CRS, DELFT_LAZ
  from data_pipelines.shared_data import shared_file

  return las_to_rasters(
    [shared_file(p) for p in DELFT_LAZ],
    folder / "delft",
    cell_size=CELL_M,
    crs=DELFT_CRS,
    progress=False,
  )["dsm"]


def mirrored_raster(src_path: Path, size: int, out: Path, rows_per_write: int = 512) -> Path:
  """An N x N raster of the source mirrored in both directions, written by row strips."""
  import numpy as np
  import rasterio
  from rasterio.windows import Window

  with rasterio.open(src_path) as src:
    dem, profile = src.read(1), src.profile
  h, w = dem.shape
  profile.update(
    width=size,
    height=size,
    tiled=True,
    blockxsize=256,
    blockysize=256,
    compress="deflate",
    BIGTIFF="IF_SAFER",
  )

  def index(n, period):  # 0..p-1, p-1..0, 0..p-1, ...
    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)

  cols = index(size, w)
  with rasterio.open(out, "w", **profile) as dst:
    for r in range(0, size, rows_per_write):
      n = min(rows_per_write, size - r)
      dst.write(dem[index(r + n, h)[r:]][:, cols], 1, window=Window(0, r, size, n))
  return out


def child(
  raster: str,
  tile: int,
  overlap: int,
  block: int,
  batch: int,
  model_kind: str,
  width: int,
  depth: int,
) -> None:
  """Runs in a fresh process; prints one JSON line."""
  import numpy as np
  from flax import nnx

  from data_pipelines.normalisation import normalise_numpy
  from demmae_jax.inference import raster as predict
  from demmae_jax.inference.apply import probabilities_fn
  from demmae_jax.models import mae, unet, upernet

  if model_kind == "unet":
    model = unet.UNet(unet.UNetConfig(width=width, depth=depth), rngs=nnx.Rngs(0))
  else:
    model = upernet.Segmenter(
      mae.build("tiny", in_chans=1, img_size=tile, patch_size=tile // 8),
      upernet.HeadConfig(layers=(0, 1, 2, 3), channels=32, aux_channels=0),
      rngs=nnx.Rngs(0),
    )
  probs = probabilities_fn(model)
  normalise = lambda dem, valid: normalise_numpy(dem, valid, "minmax")
  np.asarray(
    probs(normalise(np.zeros((batch, tile, tile), np.float32), np.ones((batch, tile, tile), bool)))
  )
  warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  opts = predict.PredictOptions(tile=tile, overlap=overlap, batch_size=batch, block=block)
  out = Path(raster).with_suffix(".pred.tif")
  t0 = time.perf_counter()
  summary = predict.predict_raster(
    raster, out, probs, normalise, opts, overwrite=True, progress=False
  )
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out.unlink()
  print(
    json.dumps(
      {
        "warm_mb": warm,
        "peak_mb": peak,
        "seconds": seconds,
        "windows": summary["windows"],
        "load": os.getloadavg()[0],
      }
    )
  )


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000])
  p.add_argument("--tile", type=int, default=128)
  p.add_argument("--overlap", type=int, default=32)
  p.add_argument("--block", type=int, default=1024)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--model", choices=["unet", "upernet"], default="unet")
  p.add_argument(
    "--width", type=int, default=4, help="UNet width (a tiny network: memory, not speed)"
  )
  p.add_argument("--depth", type=int, default=2, help="UNet depth")
  p.add_argument("--tmp", default=None, help="scratch folder for the rasters (deleted after)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    child(a.child, a.tile, a.overlap, a.block, a.batch, a.model, a.width, a.depth)
    return
  rows = []
  with tempfile.TemporaryDirectory(dir=a.tmp, prefix="predict_memory_") as scratch:
    scratch = Path(scratch)
    dsm = delft_dsm(scratch)
    for size in a.sizes:
      raster = mirrored_raster(dsm, size, scratch / f"dem_{size}.tif")
      cmd = [
        sys.executable,
        __file__,
        "--child",
        str(raster),
        "--tile",
        str(a.tile),
        "--overlap",
        str(a.overlap),
        "--block",
        str(a.block),
        "--batch",
        str(a.batch),
        "--model",
        a.model,
        "--width",
        str(a.width),
        "--depth",
        str(a.depth),
      ]
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode:
        sys.exit(f"child failed for {size}:\n{done.stderr[-3000:]}")
      r = json.loads(done.stdout.strip().splitlines()[-1])
      r.update(size=size, megapixels=size * size / 1e6, input_mb=raster.stat().st_size / 2**20)
      rows.append(r)
      raster.unlink()
      print(
        f"{size:>6} x {size:<6} ({r['megapixels']:.0f} Mpx, file {r['input_mb']:.0f} MB): "
        f"peak RSS {r['peak_mb']:.0f} MB (after warm-up {r['warm_mb']:.0f} MB, prediction adds "
        f"{r['peak_mb'] - r['warm_mb']:.0f} MB); {r['windows']} windows in {r['seconds']:.0f} s "
        f"({r['megapixels'] / r['seconds']:.2f} Mpx/s, {r['windows'] / r['seconds']:.0f} windows/s, "
        f"{r['megapixels'] * CELL_M**2 / r['seconds']:.3f} km^2/s); load average {r['load']:.1f}",
        flush=True,
      )
  base = rows[0]
  for r in rows[1:]:
    print(
      f"{r['size']} vs {base['size']}: {r['megapixels'] / base['megapixels']:.1f}x the pixels, "
      f"peak RSS ratio {r['peak_mb'] / base['peak_mb']:.3f}, growth beyond warm-up "
      f"{r['peak_mb'] - r['warm_mb']:.0f} MB vs {base['peak_mb'] - base['warm_mb']:.0f} MB, "
      f"throughput ratio {(r['windows'] / r['seconds']) / (base['windows'] / base['seconds']):.2f} "
      f"(model {a.model}{f' width {a.width} depth {a.depth}' if a.model == 'unet' else ''}, "
      f"tile {a.tile}, overlap {a.overlap}, block {a.block}, batch {a.batch})"
    )


if __name__ == "__main__":
  main()
