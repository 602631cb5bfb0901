"""Reading raster bands so that a corrupt or truncated file is named in the error
(GDAL's own message is "Read failed. See previous exception for details.")."""
from __future__ import annotations

import numpy as np
import rasterio
import rasterio.errors

from data_pipelines.errors import DataError


def read_band(src: rasterio.DatasetReader, window=None, masked: bool = False) -> np.ndarray:
  try:
    return src.read(1, window=window, masked=masked)
  except rasterio.errors.RasterioIOError as e:
    raise DataError(src.name, f"corrupt or truncated raster, reading {window or 'the band'} failed ({e})") from e
