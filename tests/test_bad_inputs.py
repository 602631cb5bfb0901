"""Bad input never destroys data or passes silently (issue 16): each case runs a script as a user
would (in-process through `main`, the same code path as the command line, to keep the suite quick)
and asserts the exit code, that the one-line message names the file and the problem, that no
partial output or temporary is visible afterwards, and that earlier files are byte-identical.

Cases are named after what they check. The kill/SIGTERM trials at random points (20+ each, seeded)
are benchmarks/kill_trials.py, results in docs/bad_inputs.md; one SIGTERM and one kill -9 of each
of tiles and predict run here as subprocesses (marked slow)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import tensorflow as tf
from rasterio.transform import from_origin

from data_pipelines import atomic
from data_pipelines.synthetic import synthetic_scene, write_las, write_scene_geotiffs
from data_pipelines.tile_records import encode_tile
from data_pipelines.tile_writer import write_tiles
from demmae_jax.train import cli
from script_support import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
X0, Y0 = 500_000.0, 5_000_000.0  # UTM 31N
SIZE = 128  # scene side in pixels, 0.5 m cells


# ------------------------------------------------------------------------------ helpers
prepare_data = load_script("prepare_data")


def run_absl_script(name, *args):
  """scripts/<name>.py run in-process under the CLI contract (cli.execute); its absl flags are
  removed again afterwards, so that the next script can define its own."""
  from absl import flags

  argv = [str(SCRIPTS / f"{name}.py"), *map(str, args)]
  before, saved = set(flags.FLAGS), sys.argv
  sys.argv = argv  # config_flags registers the --config.* overrides it finds in sys.argv
  try:
    module = load_script(name)
    return cli.execute(getattr(module, "guarded_main", module.main), argv)
  finally:
    sys.argv = saved
    flags.FLAGS.unparse_flags()
    for n in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, n)


def snapshot(folder) -> dict:
  """Every entry under `folder` (hidden temporaries too) with its bytes' digest."""
  folder = Path(folder)
  return {
    str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    for p in sorted(folder.rglob("*"))
  }


def assert_one_line_error(err: str, prog: str, *needles: str):
  """The error is the last line, `prog: error: ...`, holding each needle; no traceback."""
  assert "Traceback" not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"{prog}: error: "), err
  for needle in needles:
    assert needle in last, (needle, last)


def write_raster(
  path,
  data,
  crs="EPSG:32631",
  transform=from_origin(X0, Y0, 0.5, 0.5),
  nodata=None,
  dtype="float32",
):
  data = np.asarray(data)
  data = data[None] if data.ndim == 2 else data
  with rasterio.open(
    path,
    "w",
    driver="GTiff",
    width=data.shape[2],
    height=data.shape[1],
    count=data.shape[0],
    dtype=dtype,
    crs=crs,
    transform=transform,
    nodata=nodata,
  ) as dst:
    dst.write(data.astype(dtype))
  return Path(path)


def write_vector(path, geoms, crs="EPSG:32631", kinds=None):
  fields = [np.array(kinds, dtype=object)] if kinds is not None else None
  driver = "GeoJSON" if str(path).endswith("json") else "ESRI Shapefile"
  pyogrio.raw.write(
    path,
    shapely.to_wkb(np.array(geoms, dtype=object)),
    field_data=fields,
    fields=["kind"] if kinds is not None else None,
    crs=crs,
    geometry_type="Polygon",
    driver=driver,
  )
  return Path(path)


def dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
  """A synthetic 128 x 128 DSM at 0.5 m (UTM 31N) with building labels, as GeoTIFFs."""
  return write_scene_geotiffs(
    synthetic_scene(SIZE, SIZE, seed=5),
    tmp_path_factory.mktemp("scene"),
    origin=(X0, Y0),
    cell_size=0.5,
    label_value=1,
  )


@pytest.fixture(scope="module")
def tiles(scene, tmp_path_factory):
  return write_tiles(
    scene["dsm"],
    tmp_path_factory.mktemp("tiles") / "t",
    label=scene["label"],
    tile_size=32,
    block_px=32,
    min_labelled=0,
    progress=False,
    dtype="float16",
  )


@pytest.fixture(scope="module")
def workdir(tiles, tmp_path_factory):
  """A real finetuning workdir (tiny UperNet, 1 step): what predict and evaluate read."""
  from demmae_jax import config_files
  from demmae_jax.train import finetune

  config = config_files.get_config(
    "finetune",
    "tiny",
    **{
      "data.manifest": str(tiles),
      "total_steps": 1,
      "optim.warmup_steps": 0,
      "eval_every_steps": 0,
      "checkpoint.every_steps": 1,
      "log.progress": False,
      "log.tensorboard": False,
    },
  )
  out = tmp_path_factory.mktemp("runs") / "w"
  finetune.run(config, out)
  return out


def _dem(scene):
  with rasterio.open(scene["dsm"]) as src:
    return src.read(1)


def copy_tiles(tiles, dst):
  shutil.copytree(Path(tiles).parent, dst)
  return dst / "manifest.json"


# ------------------------------------------------------------------------------ prepare_data
def _case_tiles_output_holds_the_input(tmp, scene):
  (tmp / "t").mkdir()
  shutil.copy(scene["dsm"], tmp / "t" / "dsm.tif")
  return [
    "tiles",
    "--dem",
    tmp / "t" / "dsm.tif",
    "--out",
    tmp / "t",
    "--overwrite",
    "--tile-size",
    "32",
  ], ["t: holds the input", "replacing it would destroy the input"]


def _case_labels_output_is_the_dem(tmp, scene):
  shutil.copy(scene["dsm"], tmp / "dsm.tif")
  write_vector(tmp / "b.geojson", [shapely.box(X0 + 5, Y0 - 20, X0 + 20, Y0 - 5)])
  return [
    "labels",
    "--dem",
    tmp / "dsm.tif",
    "--vector",
    tmp / "b.geojson",
    "--out",
    tmp / "dsm.tif",
    "--overwrite",
  ], ["dsm.tif: is the input", "would destroy the input"]


def _case_labels_output_is_the_dem_through_a_symlink(tmp, scene):
  shutil.copy(scene["dsm"], tmp / "dsm.tif")
  (tmp / "link.tif").symlink_to(tmp / "dsm.tif")
  write_vector(tmp / "b.geojson", [shapely.box(X0 + 5, Y0 - 20, X0 + 20, Y0 - 5)])
  return [
    "labels",
    "--dem",
    tmp / "dsm.tif",
    "--vector",
    tmp / "b.geojson",
    "--out",
    tmp / "link.tif",
    "--overwrite",
  ], ["link.tif: is the input", "both resolve to"]


def _case_labels_output_is_the_dem_through_a_hard_link(tmp, scene):
  shutil.copy(scene["dsm"], tmp / "dsm.tif")
  os.link(tmp / "dsm.tif", tmp / "hard.tif")
  write_vector(tmp / "b.geojson", [shapely.box(X0 + 5, Y0 - 20, X0 + 20, Y0 - 5)])
  return [
    "labels",
    "--dem",
    tmp / "dsm.tif",
    "--vector",
    tmp / "b.geojson",
    "--out",
    tmp / "hard.tif",
    "--overwrite",
  ], ["hard.tif: is the input"]


def _case_tiles_refuse_a_geographic_crs(tmp, scene):
  dem = np.random.default_rng(0).uniform(0, 10, (64, 64))
  write_raster(tmp / "geo.tif", dem, crs="EPSG:4326", transform=from_origin(4.3, 52.0, 0.5, 0.5))
  return ["tiles", "--dem", tmp / "geo.tif", "--out", tmp / "t", "--tile-size", "32"], [
    "geo.tif: is in a geographic CRS (EPSG:4326)",
    "gdalwarp -t_srs",
    "--cell-size-m",
  ]


def _case_tiles_refuse_three_bands_without_band(tmp, scene):
  write_raster(
    tmp / "rgb.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 64)), dtype="uint8"
  )
  return ["tiles", "--dem", tmp / "rgb.tif", "--out", tmp / "t", "--tile-size", "32"], [
    "rgb.tif: has 3 bands",
    "--band N",
  ]


def _case_tiles_refuse_a_two_band_label_raster(tmp, scene):
  with rasterio.open(scene["label"]) as src:
    lab = src.read(1)
  write_raster(tmp / "lab2.tif", np.stack([lab, lab]), dtype="uint8")
  return [
    "tiles",
    "--dem",
    scene["dsm"],
    "--label",
    tmp / "lab2.tif",
    "--out",
    tmp / "t",
    "--tile-size",
    "32",
  ], ["lab2.tif: has 2 bands but a label raster has one"]


def _case_tiles_missing_input_is_named(tmp, scene):
  return ["tiles", "--dem", tmp / "nosuch.tif", "--out", tmp / "t"], ["nosuch.tif: no such file"]


def _case_tiles_truncated_geotiff_is_named(tmp, scene):
  raw = Path(scene["dsm"]).read_bytes()
  (tmp / "cut.tif").write_bytes(raw[: len(raw) // 3])
  return ["tiles", "--dem", tmp / "cut.tif", "--out", tmp / "t", "--tile-size", "32"], ["cut.tif: "]


def _case_tiles_undeclared_nodata_is_not_terrain(tmp, scene):
  with rasterio.open(scene["dsm"]) as src:
    dem = src.read(1)
  dem[:40, :40] = -9999.0  # nodata value the file does not declare
  write_raster(tmp / "undeclared.tif", dem)
  return ["tiles", "--dem", tmp / "undeclared.tif", "--out", tmp / "t", "--tile-size", "32"], [
    "undeclared.tif: holds elevations from -9999",
    "gdal_edit.py -a_nodata",
  ]


def _case_tiles_all_nodata_raster(tmp, scene):
  write_raster(tmp / "empty.tif", np.full((64, 64), np.nan), nodata=np.nan)
  return ["tiles", "--dem", tmp / "empty.tif", "--out", tmp / "t", "--tile-size", "32"], [
    "empty.tif: no valid labelled pixel"
  ]


def _case_tiles_raster_without_geotransform(tmp, scene):
  dem = _dem(scene)
  with rasterio.open(
    tmp / "nogeo.tif",
    "w",
    driver="GTiff",
    width=SIZE,
    height=SIZE,
    count=1,
    dtype="float32",
    crs="EPSG:32631",
  ) as dst:
    dst.write(dem, 1)
  return ["tiles", "--dem", tmp / "nogeo.tif", "--out", tmp / "t", "--tile-size", "32"], [
    "nogeo.tif: has no geotransform"
  ]


def _case_existing_output_is_kept(tmp, scene):
  (tmp / "t").mkdir()
  (tmp / "t" / "manifest.json").write_text("earlier output")
  return ["tiles", "--dem", scene["dsm"], "--out", tmp / "t", "--tile-size", "32"], [
    "t already exists",
    "--overwrite",
  ]


def _case_output_folder_under_a_file(tmp, scene):
  (tmp / "afile").write_text("not a folder")
  return [
    "labels",
    "--dem",
    scene["dsm"],
    "--vector",
    tmp / "afile",
    "--out",
    tmp / "afile" / "l.tif",
  ], ["afile/l.tif: cannot be written", "is a file, not a folder"]


def _case_labels_misspelt_field_lists_the_fields(tmp, scene):
  write_vector(tmp / "b.geojson", [shapely.box(X0 + 5, Y0 - 20, X0 + 20, Y0 - 5)], kinds=["house"])
  return [
    "labels",
    "--dem",
    scene["dsm"],
    "--vector",
    tmp / "b.geojson",
    "--field",
    "kidn",
    "--values",
    "house",
    "--out",
    tmp / "l.tif",
  ], ["b.geojson: has no field 'kidn'; its fields are ['kind']"]


def _case_labels_vector_without_crs_says_crs(tmp, scene):
  write_vector(tmp / "b.shp", [shapely.box(X0 + 5, Y0 - 20, X0 + 20, Y0 - 5)], crs=None)
  return ["labels", "--dem", scene["dsm"], "--vector", tmp / "b.shp", "--out", tmp / "l.tif"], [
    "b.shp: layer has no CRS; give one with --crs"
  ]


def _case_labels_missing_vector_is_named(tmp, scene):
  return [
    "labels",
    "--dem",
    scene["dsm"],
    "--vector",
    tmp / "nosuch.gpkg",
    "--out",
    tmp / "l.tif",
  ], ["nosuch.gpkg: no such file"]


def _case_lidar_header_without_crs(tmp, scene):
  rng = np.random.default_rng(0)
  write_las(
    tmp / "a.laz",
    np.c_[rng.uniform([X0, Y0], [X0 + 30, Y0 + 30], (3000, 2)), rng.normal(1, 0.1, 3000)],
    np.full(3000, 2),
  )
  return ["lidar", tmp / "a.laz", "--out", tmp / "r"], ["a.laz: header has no CRS", "--crs"]


def _case_lidar_in_degrees_is_refused(tmp, scene):
  rng = np.random.default_rng(0)
  write_las(
    tmp / "a.laz",
    np.c_[rng.uniform([4.3, 52.0], [4.31, 52.01], (3000, 2)), rng.normal(1, 0.1, 3000)],
    np.full(3000, 2),
    crs="EPSG:4326",
  )
  return ["lidar", tmp / "a.laz", "--out", tmp / "r"], ["a.laz: is in a geographic CRS"]


def _case_lidar_truncated_laz_is_named(tmp, scene):
  rng = np.random.default_rng(0)
  write_las(
    tmp / "full.laz",
    np.c_[rng.uniform([X0, Y0], [X0 + 30, Y0 + 30], (20000, 2)), rng.normal(1, 0.1, 20000)],
    np.full(20000, 2),
    crs="EPSG:32631",
  )
  raw = (tmp / "full.laz").read_bytes()
  (tmp / "cut.laz").write_bytes(raw[: len(raw) // 2])
  (tmp / "full.laz").unlink()
  return ["lidar", tmp / "cut.laz", "--out", tmp / "r", "--cell-size", "1"], ["cut.laz: "]


PREPARE_CASES = {
  name[len("_case_") :]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")
}


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_prepare_data_refuses(case, tmp_path, scene, capsys):
  args, needles = PREPARE_CASES[case](tmp_path, scene)
  before = snapshot(tmp_path)
  assert prepare_data.main([str(a) for a in args]) == 2
  assert_one_line_error(capsys.readouterr().err, "prepare_data", *needles)
  assert snapshot(tmp_path) == before  # nothing new (no temporary either), earlier files unchanged


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, scene, capsys):
  (tmp_path / "ro").mkdir()
  (tmp_path / "ro").chmod(0o555)
  try:
    assert (
      prepare_data.main(["tiles", "--dem", str(scene["dsm"]), "--out", str(tmp_path / "ro" / "t")])
      == 2
    )
  finally:
    (tmp_path / "ro").chmod(0o755)
  assert_one_line_error(
    capsys.readouterr().err, "prepare_data", "ro/t: cannot be written: no write permission"
  )


def test_tiles_take_the_band_given_and_store_metres_for_a_feet_crs(tmp_path, scene, capsys):
  with rasterio.open(scene["dsm"]) as src:
    dem = src.read(1)
  write_raster(tmp_path / "two.tif", np.stack([np.zeros_like(dem), dem]))
  assert (
    prepare_data.main(
      [
        "tiles",
        "--dem",
        str(tmp_path / "two.tif"),
        "--band",
        "2",
        "--tile-size",
        "32",
        "--out",
        str(tmp_path / "t"),
        "--min-valid",
        "0.5",
      ]
    )
    == 0
  )
  m = json.loads((tmp_path / "t" / "manifest.json").read_text())
  assert m["stats"]["elevation"]["min"] > 50  # the scene stands on 100 m terrain; band 1 is 0
  feet = 0.5 / 0.3048006096012192  # 0.5 m in US survey feet (EPSG:2263)
  write_raster(
    tmp_path / "ft.tif", dem, crs="EPSG:2263", transform=from_origin(9e5, 2e5, feet, feet)
  )
  assert (
    prepare_data.main(
      [
        "tiles",
        "--dem",
        str(tmp_path / "ft.tif"),
        "--tile-size",
        "32",
        "--out",
        str(tmp_path / "tf"),
      ]
    )
    == 0
  )
  assert json.loads((tmp_path / "tf" / "manifest.json").read_text())["cell_size"] == pytest.approx(
    0.5
  )
  assert prepare_data.main(["check", str(tmp_path / "tf" / "manifest.json")]) == 0


def test_tile_folders_get_ordinary_modes(tmp_path, scene):
  mask = os.umask(0o022)
  try:
    write_tiles(scene["dsm"], tmp_path / "t", tile_size=32, progress=False)
  finally:
    os.umask(mask)
  assert (tmp_path / "t").stat().st_mode & 0o777 == 0o755
  assert (tmp_path / "t" / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_labels_repair_a_self_intersecting_polygon_and_name_it(tmp_path, scene, capsys):
  bow = shapely.Polygon(
    [(X0 + 5, Y0 - 5), (X0 + 25, Y0 - 25), (X0 + 25, Y0 - 5), (X0 + 5, Y0 - 25)]
  )
  assert not bow.is_valid
  write_vector(tmp_path / "bow.geojson", [shapely.box(X0 + 40, Y0 - 50, X0 + 50, Y0 - 40), bow])
  assert (
    prepare_data.main(
      [
        "labels",
        "--dem",
        str(scene["dsm"]),
        "--vector",
        str(tmp_path / "bow.geojson"),
        "--out",
        str(tmp_path / "l.tif"),
      ]
    )
    == 0
  )
  err = capsys.readouterr().err
  assert "bow.geojson: repaired 1 invalid geometry with make_valid: feature id(s) [1]" in err
  with rasterio.open(tmp_path / "l.tif") as src:
    label = src.read(1)
  # 0.5 m cells: the bow-tie spans rows and columns 10..50 and crosses itself at (30, 30)
  assert label[30, 15] == 1 and label[30, 45] == 1  # both triangles are labelled
  assert label[12, 30] == 0  # the notch between them is not


def test_labels_crs_option_reads_a_vector_without_crs(tmp_path, scene):
  write_vector(tmp_path / "b.shp", [shapely.box(X0 + 5, Y0 - 20, X0 + 20, Y0 - 5)], crs=None)
  assert (
    prepare_data.main(
      [
        "labels",
        "--dem",
        str(scene["dsm"]),
        "--vector",
        str(tmp_path / "b.shp"),
        "--crs",
        "EPSG:32631",
        "--out",
        str(tmp_path / "l.tif"),
      ]
    )
    == 0
  )
  with rasterio.open(tmp_path / "l.tif") as src:
    assert src.read(1)[20, 20] == 1


def _wrong_shape_record(manifest):
  m = json.loads(Path(manifest).read_text())
  path = Path(manifest).parent / m["splits"]["test"]["files"][0]
  records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
  z = np.zeros((16, 16), np.float32)
  bad = encode_tile(
    {"elevation": z},
    np.ones((16, 16), bool),
    np.zeros((16, 16), np.uint8),
    "float16",
    dict(
      transform=(0.5, 0, 0, 0, -0.5, 0),
      window=(0, 0, 16, 16),
      tile_id=999,
      cell_size=0.5,
      crs_wkt="x",
      source="s",
    ),
  )
  with tf.io.TFRecordWriter(str(path)) as w:
    for r in records[:1] + [bad] + records[1:-1]:  # same count: only decoding finds it
      w.write(r)
  return path.name, "record 1 does not match the manifest: 'elevation' holds 512 bytes"


def _deleted_shard(manifest):
  m = json.loads(Path(manifest).read_text())
  name = m["splits"]["test"]["files"][0]
  (Path(manifest).parent / name).unlink()
  return name, "listed in the tile manifest"


def _truncated_shard(manifest):
  m = json.loads(Path(manifest).read_text())
  path = Path(manifest).parent / m["splits"]["test"]["files"][0]
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) - 100])
  return path.name, "corrupt or truncated TFRecord"


def _missing_record(manifest):
  m = json.loads(Path(manifest).read_text())
  path = Path(manifest).parent / m["splits"]["test"]["files"][0]
  records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
  with tf.io.TFRecordWriter(str(path)) as w:
    for r in records[:-1]:
      w.write(r)
  return path.name, "records but the manifest lists"


SHARD_DAMAGE = {
  "wrong_shape_record": _wrong_shape_record,
  "deleted_shard": _deleted_shard,
  "truncated_shard": _truncated_shard,
  "missing_record": _missing_record,
}


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGE))
def test_check_decodes_every_record_and_names_the_shard(damage, tiles, tmp_path, capsys):
  manifest = copy_tiles(tiles, tmp_path / "t")
  assert prepare_data.main(["check", str(manifest)]) == 0
  name, problem = SHARD_DAMAGE[damage](manifest)
  capsys.readouterr()
  assert prepare_data.main(["check", str(manifest)]) == 2
  assert_one_line_error(capsys.readouterr().err, "prepare_data", name, problem)


def test_debug_prints_the_traceback_of_an_expected_error(tmp_path, capsys):
  assert (
    prepare_data.main(
      ["tiles", "--dem", str(tmp_path / "nosuch.tif"), "--out", str(tmp_path / "t"), "--debug"]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().endswith("nosuch.tif: no such file")


# ------------------------------------------------------------------------------ stale temporaries
def test_next_write_sweeps_a_killed_runs_temporaries_but_not_a_live_ones(tmp_path):
  dead, live = dead_pid(), os.getpid()
  stale_file = tmp_path / f".out.tif.{atomic.HOST}-{dead}.abc123.tmp"
  stale_dir = tmp_path / f".tiles.{atomic.HOST}-{dead}.x_y.tmp"
  live_file = tmp_path / f".out.tif.{atomic.HOST}-{live}.abc124.tmp"
  other_host = tmp_path / f".out.tif.00000000-{dead}.abc125.tmp"
  stale_file.write_bytes(b"x" * 100)
  stale_dir.mkdir()
  (stale_dir / "shard.tfrecord").write_bytes(b"y")
  live_file.write_bytes(b"z")
  other_host.write_bytes(b"w")
  with atomic.atomic_file(tmp_path / "new.txt") as tmp:
    tmp.write_text("new")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    [live_file.name, other_host.name, "new.txt"]
  )


def test_sweep_puts_back_an_output_moved_aside_by_a_killed_overwrite(tmp_path):
  old = tmp_path / f".tiles.{atomic.HOST}-{dead_pid()}.q1w2.old"
  (old / "x").mkdir(parents=True)
  (old / "x" / "manifest.json").write_text("earlier output")
  assert atomic.sweep_stale(tmp_path)
  assert (tmp_path / "tiles" / "manifest.json").read_text() == "earlier output" and not old.exists()


# ------------------------------------------------------------------------------ predict
def _p_output_is_the_input(tmp, scene):
  shutil.copy(scene["dsm"], tmp / "dsm.tif")
  return ["--input", tmp / "dsm.tif", "--output", tmp / "dsm.tif", "--overwrite"], [
    "dsm.tif: is the input",
    "would destroy the input",
  ]


def _p_output_is_the_input_through_a_symlink(tmp, scene):
  shutil.copy(scene["dsm"], tmp / "dsm.tif")
  (tmp / "link.tif").symlink_to(tmp / "dsm.tif")
  return ["--input", tmp / "link.tif", "--output", tmp / "dsm.tif", "--overwrite"], [
    "dsm.tif: is the input",
    "both resolve to",
  ]


def _p_probabilities_is_the_input(tmp, scene):
  shutil.copy(scene["dsm"], tmp / "dsm.tif")
  return [
    "--input",
    tmp / "dsm.tif",
    "--output",
    tmp / "o.tif",
    "--probabilities",
    tmp / "dsm.tif",
    "--overwrite",
  ], ["dsm.tif: is the input"]


def _p_geographic_crs(tmp, scene):
  write_raster(
    tmp / "geo.tif", _dem(scene), crs="EPSG:4326", transform=from_origin(4.3, 52.0, 0.5, 0.5)
  )
  return ["--input", tmp / "geo.tif", "--output", tmp / "o.tif"], [
    "geo.tif: is in a geographic CRS",
    "--cell_size_m",
  ]


def _p_other_cell_size_in_metres(tmp, scene):
  feet = 0.5  # 0.5 US feet = 0.15 m, not the model's 0.5 m: the number alone would match
  write_raster(
    tmp / "ft.tif", _dem(scene), crs="EPSG:2263", transform=from_origin(9e5, 2e5, feet, feet)
  )
  return ["--input", tmp / "ft.tif", "--output", tmp / "o.tif"], [
    "ft.tif: cell size 0.1524 m but the model was trained on 0.5 m tiles"
  ]


def _p_all_nodata(tmp, scene):
  write_raster(tmp / "empty.tif", np.full((64, 64), -9999.0), nodata=-9999.0)
  return ["--input", tmp / "empty.tif", "--output", tmp / "o.tif", "--polygons", tmp / "o.gpkg"], [
    "empty.tif: has no valid pixel",
    "no output was written",
  ]


def _p_truncated_geotiff(tmp, scene):
  raw = Path(scene["dsm"]).read_bytes()
  (tmp / "cut.tif").write_bytes(raw[: len(raw) // 3])
  return ["--input", tmp / "cut.tif", "--output", tmp / "o.tif"], ["cut.tif: "]


def _p_missing_input(tmp, scene):
  return ["--input", tmp / "nosuch.tif", "--output", tmp / "o.tif"], ["nosuch.tif: No such file"]


def _p_three_bands(tmp, scene):
  dem = _dem(scene)
  write_raster(tmp / "rgb.tif", np.stack([dem, dem, dem]))
  return ["--input", tmp / "rgb.tif", "--output", tmp / "o.tif"], [
    "rgb.tif: has 3 bands",
    "--band N",
  ]


def _p_no_crs(tmp, scene):
  write_raster(tmp / "nocrs.tif", _dem(scene), crs=None)
  return ["--input", tmp / "nocrs.tif", "--output", tmp / "o.tif"], [
    "nocrs.tif: has no CRS",
    "--crs",
  ]


def _p_existing_output(tmp, scene):
  (tmp / "o.tif").write_bytes(b"earlier output")
  return ["--input", scene["dsm"], "--output", tmp / "o.tif"], [
    "o.tif already exist",
    "--overwrite",
  ]


def _p_output_under_a_file(tmp, scene):
  (tmp / "afile").write_text("x")
  return ["--input", scene["dsm"], "--output", tmp / "o.tif", "--png", tmp / "afile" / "p.png"], [
    "afile/p.png: cannot be written",
    "is a file, not a folder",
  ]


def _p_output_is_a_workdir_file(tmp, scene):
  return ["--input", scene["dsm"], "--output", "WORKDIR/segmenter.json", "--overwrite"], [
    "segmenter.json: is the input"
  ]


PREDICT_CASES = {
  name[len("_p_") :]: fn for name, fn in dict(globals()).items() if name.startswith("_p_")
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_refuses(case, tmp_path, scene, workdir, capsys):
  args, needles = PREDICT_CASES[case](tmp_path, scene)
  args = [str(a).replace("WORKDIR", str(workdir)) for a in args]
  before, before_workdir = snapshot(tmp_path), snapshot(workdir)
  assert run_absl_script("predict", f"--workdir={workdir}", *args) == 2
  assert_one_line_error(capsys.readouterr().err, "predict", *needles)
  assert snapshot(tmp_path) == before and snapshot(workdir) == before_workdir


def test_predict_warns_on_a_mostly_nodata_raster_and_makes_the_polygons_folder(
  tmp_path, scene, workdir, capsys
):
  dem = _dem(scene)
  dem[:, :90] = -9999.0
  write_raster(tmp_path / "holes.tif", dem, nodata=-9999.0)
  assert (
    run_absl_script(
      "predict",
      f"--workdir={workdir}",
      f"--input={tmp_path / 'holes.tif'}",
      f"--output={tmp_path / 'o.tif'}",
      f"--polygons={tmp_path / 'new' / 'p.gpkg'}",
    )
    == 0
  )
  err = capsys.readouterr().err
  assert "predict: warning: 70% of" in err and "holes.tif is nodata" in err
  assert (tmp_path / "new" / "p.gpkg").exists()
  assert not [p for p in tmp_path.rglob(".*")]  # no temporary left


# ------------------------------------------------------------------------------ evaluate
EVAL_DAMAGE = {"wrong_shape_record": _wrong_shape_record, "deleted_shard": _deleted_shard}


@pytest.mark.parametrize("damage", sorted(EVAL_DAMAGE))
def test_evaluate_names_the_damaged_shard(damage, tiles, workdir, tmp_path, capsys):
  manifest = copy_tiles(tiles, tmp_path / "t")
  name, problem = EVAL_DAMAGE[damage](manifest)
  before = snapshot(tmp_path)
  assert (
    run_absl_script(
      "evaluate",
      f"--workdir={workdir}",
      f"--manifest={manifest}",
      f"--out={tmp_path / 'eval'}",
      "--pictures=0",
    )
    == 2
  )
  assert_one_line_error(capsys.readouterr().err, "evaluate", name, problem)
  assert snapshot(tmp_path) == before


def test_evaluate_names_a_truncated_checkpoint(workdir, tmp_path, capsys):
  work = tmp_path / "w"
  shutil.copytree(workdir, work)
  # Every array data file cut in half, as an interrupted copy leaves them: which file holds the
  # parameters (all evaluate reads; the optimiser state is skipped) varies between runs.
  data = [p for p in (work / "checkpoints").rglob("d/*") if p.is_file()]
  assert data
  for p in data:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  before = snapshot(tmp_path)
  assert (
    run_absl_script("evaluate", f"--workdir={work}", f"--out={tmp_path / 'eval'}", "--pictures=0")
    == 2
  )
  assert_one_line_error(
    capsys.readouterr().err,
    "evaluate",
    str(work / "checkpoints" / "1"),
    "checkpoint cannot be read: damaged or truncated",
  )
  assert snapshot(tmp_path) == before


def test_evaluate_out_of_the_workdir_itself_is_refused(workdir, capsys):
  before = snapshot(workdir)
  assert run_absl_script("evaluate", f"--workdir={workdir}", f"--out={workdir}", "--overwrite") == 2
  assert_one_line_error(capsys.readouterr().err, "evaluate", "is the input")
  assert snapshot(workdir) == before


# ------------------------------------------------------------------------------ finetune
FINETUNE_CASES = {
  "config_failing_validation_leaves_no_config": (
    ["--config=CONFIGS/finetune.py:tiny", "--config.total_steps=2"],
    ["warmup_steps (3) must be < total_steps (2)"],
  ),
  "unknown_preset": (
    ["--config=CONFIGS/finetune.py:nosuch"],
    ["finetune.py: unknown preset 'nosuch'; choose one of"],
  ),
  "config_path_relative_to_another_folder": (
    ["--config=configs/finetune.py:tiny", "--config.total_steps=2"],
    ["configs/finetune.py: config file not found", "did you mean"],
  ),
  "mistyped_config_key": (
    ["--config=CONFIGS/finetune.py:tiny", "--config.optim.lrr=1"],
    ["bad config override", 'Did you mean "lr"'],
  ),
  "workdir_under_a_file": (
    ["--config=CONFIGS/finetune.py:tiny", "--workdir=FILE/w"],
    ["afile/w/config.json: cannot be written", "is a file, not a folder"],
  ),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_CASES))
def test_finetune_refuses_and_writes_nothing(case, tiles, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)  # relative config paths are then relative to another folder
  (tmp_path / "afile").write_text("x")
  args, needles = FINETUNE_CASES[case]
  args = [
    a.replace("CONFIGS", str(ROOT / "configs")).replace("FILE", str(tmp_path / "afile"))
    for a in args
  ]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'w'}")
  before = snapshot(tmp_path)
  assert run_absl_script("finetune", *args, f"--config.data.manifest={tiles}") == 2
  assert_one_line_error(capsys.readouterr().err, "finetune", *needles)
  assert snapshot(tmp_path) == before  # no config.json: the corrected rerun is not "another config"


# ------------------------------------------------------------------------------ fuzzing
# Seeded corruption of real files (benchmarks/fuzz_readers.py runs many more seeds): the file is
# read, or refused with a DataError naming it and nothing left behind; anything else fails.
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_readers  # noqa: E402

FUZZ_SEEDS = range(8)


@pytest.fixture(scope="module")
def real_laz(tmp_path_factory):
  return fuzz_readers.small_real_laz(tmp_path_factory.mktemp("laz"))


@pytest.fixture(scope="module")
def real_tiles(tmp_path_factory):
  return fuzz_readers.real_tiles(tmp_path_factory.mktemp("alex"))


@pytest.mark.realdata
@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_fuzzed_real_laz_is_read_or_refused_cleanly(seed, real_laz, tmp_path):
  assert fuzz_readers.fuzz_laz(seed, real_laz, tmp_path / "f")[0] in ("read", "refused")


@pytest.mark.realdata
@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_fuzzed_real_geotiff_is_tiled_or_refused_cleanly(seed, tmp_path):
  from data_pipelines.shared_data import shared_file

  tif = shared_file("alexandria/dsm.tif")
  assert fuzz_readers.fuzz_geotiff(seed, tif, tmp_path / "f")[0] in ("read", "refused")


@pytest.mark.realdata
@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_fuzzed_real_tfrecord_is_checked_and_read_cleanly(seed, real_tiles, tmp_path):
  assert fuzz_readers.fuzz_tfrecord(seed, real_tiles, tmp_path / "f")[0] in ("read", "refused")


# ------------------------------------------------------------------------------ signals (subprocesses)
def _env():
  return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")


def _wait_for(pattern_dir: Path, proc, timeout=120):
  """Until a temporary appears in `pattern_dir` (the run is mid-write) or the process ends."""
  start = time.time()
  while time.time() - start < timeout and proc.poll() is None:
    if any(p.name.endswith((".tmp",)) for p in pattern_dir.iterdir()):
      return True
    time.sleep(0.05)
  return False


@pytest.fixture(scope="module")
def big_dem(tmp_path_factory):
  """A 1024 x 1024 synthetic DSM: tiling or predicting it takes long enough to be interrupted."""
  scene = synthetic_scene(SIZE, SIZE, seed=1)
  return write_raster(tmp_path_factory.mktemp("big") / "big.tif", np.tile(scene.dsm, (8, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_interrupted_tiles_leave_earlier_output_intact_and_the_next_run_clean(
  sig, big_dem, tmp_path
):
  out = tmp_path / "out"
  out.mkdir()
  (out / "t").mkdir()
  (out / "t" / "manifest.json").write_text("earlier output")
  before = snapshot(out)
  cmd = [
    sys.executable,
    str(SCRIPTS / "prepare_data.py"),
    "tiles",
    "--dem",
    str(big_dem),
    "--tile-size",
    "32",
    "--out",
    str(out / "t"),
    "--overwrite",
  ]
  proc = subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
  )
  assert _wait_for(out, proc)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  if sig == signal.SIGTERM:
    assert proc.returncode == 143 and "prepare_data: stopped by SIGTERM" in err
    assert snapshot(out) == before  # the temporaries are gone already
  else:
    assert proc.returncode == -9
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".")} == before
  done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # swept
  assert json.loads((out / "t" / "manifest.json").read_text())["splits"]["train"]["count"] > 0


@pytest.mark.slow
def test_sigterm_of_predict_says_what_happened_and_leaves_nothing(workdir, big_dem, tmp_path):
  (tmp_path / "o.tif").write_bytes(b"earlier output")
  before = snapshot(tmp_path)
  cmd = [
    sys.executable,
    str(SCRIPTS / "predict.py"),
    f"--workdir={workdir}",
    f"--input={big_dem}",
    f"--output={tmp_path / 'o.tif'}",
    f"--probabilities={tmp_path / 'p.tif'}",
    "--overwrite",
    "--block=256",
  ]
  proc = subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
  )
  deadline = time.time() + 180
  while (
    time.time() < deadline
    and proc.poll() is None
    and not any(p.name.startswith(".p.tif") for p in tmp_path.iterdir())
  ):
    time.sleep(0.05)
  time.sleep(1.0)  # well into the prediction
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert "predict: stopped by SIGTERM: no output was written or changed" in err
  assert snapshot(tmp_path) == before
