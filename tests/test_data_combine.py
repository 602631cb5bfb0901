"""combine_tile_sets: several areas' tile sets read as one (leave-one-area-out training)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines.combine import combine_tile_sets
from data_pipelines.errors import DataError
from data_pipelines.reader import make_dataset, read_manifest, split_files
from data_pipelines.synthetic import synthetic_scene, write_scene_geotiffs
from data_pipelines.tile_records import decode_tile_numpy
from data_pipelines.tile_writer import write_tiles

ONE_HOST = dict(process_index=0, process_count=1)
EVAL = dict(
  augment=False, shuffle=False, repeat=False, drop_remainder=False, with_meta=True, **ONE_HOST
)


def _area(folder, place, seed, size=160, tile=32, cell=1.0, origin=(500_000.0, 5_000_000.0)):
  scene = synthetic_scene(size, size, seed=seed, n_buildings=15)
  tifs = write_scene_geotiffs(
    scene, folder / place / "tif", origin=origin, cell_size=cell, label_value=1
  )
  return write_tiles(
    tifs["dsm"],
    folder / place / "tiles",
    label=tifs["label"],
    extras={"ndsm": tifs["ndsm"]},
    tile_size=tile,
    stride=tile // 2,
    block_px=2 * tile,
    min_labelled=0,
    dtype="float16",
    tiles_per_shard=16,
    label_names={0: "background", 1: "building"},
    progress=False,
    extra_manifest={"preset": {"name": place, "place": place}},
  )


@pytest.fixture(scope="module")
def areas(tmp_path_factory):
  root = tmp_path_factory.mktemp("areas")
  return {
    name: _area(root, name, seed, origin=(500_000.0 + 10_000 * seed, 5_000_000.0))
    for seed, name in enumerate(("a", "b", "c"), start=1)
  }


def _read(manifest, split):
  """(transform bytes, tile) of every tile the reader yields for `split`."""
  out = []
  for batch in make_dataset(str(manifest), split, global_batch_size=5, **EVAL):
    out += [(bytes(t), batch["label"][i]) for i, t in enumerate(batch["transform"])]
  return out


def _member_tiles(manifest, splits):
  m = read_manifest(str(manifest))
  return [
    decode_tile_numpy(r, m["channels"], m["dtype"], m["tile_size"])
    for s in splits
    for r in tf.data.TFRecordDataset(split_files(m, s)).as_numpy_iterator()
  ]


def test_the_reader_reads_the_union_and_counts_add_up(areas, tmp_path):
  members = [areas["a"], areas["b"]]
  path = combine_tile_sets(members, tmp_path / "ab")
  m = json.loads(path.read_text())
  ms = [json.loads(p.read_text()) for p in members]
  for split in ("train", "val", "test"):
    want = [t["transform"].tobytes() for p in members for t in _member_tiles(p, [split])]
    got = _read(path, split)
    assert (
      m["splits"][split]["count"] == sum(x["splits"][split]["count"] for x in ms) == len(got) > 0
    )
    assert sorted(g for g, _ in got) == sorted(want)  # every member tile once, nothing else
    summed = {}
    for x in ms:
      for k, v in x["splits"][split]["classes"]["pixel_counts"].items():
        summed[k] = summed.get(k, 0) + v
    assert m["splits"][split]["classes"]["pixel_counts"] == summed
    assert len(set(m["splits"][split]["tile_ids"])) == m["splits"][split]["count"]
  # statistics of the union's training pixels, as each member's are of its own
  train = [t for p in members for t in _member_tiles(p, ["train"])]
  pixels = np.concatenate([t["elevation"][t["valid"] > 0] for t in train])
  assert m["stats"]["elevation"]["mean"] == pytest.approx(pixels.mean(), rel=1e-6)
  assert m["stats"]["elevation"]["min"] == pytest.approx(
    min(x["stats"]["elevation"]["min"] for x in ms), abs=0.02
  )
  assert m["stats"]["ndsm"]["count"] == pixels.size
  # a later-member tile id is offset past the earlier member's candidates
  assert max(m["splits"]["train"]["tile_ids"]) >= ms[0]["candidates"]


def test_few_label_subsets_are_nested_draws_from_the_combined_training_tiles(areas, tmp_path):
  path = combine_tile_sets([areas["a"], areas["b"], areas["c"]], tmp_path / "abc", seed=3)
  m = json.loads(path.read_text())
  assert list(m["subsets"]) == ["train_10", "train_50"]
  train = {g for g, _ in _read(path, "train")}
  t10, t50 = ({g for g, _ in _read(path, s)} for s in ("train_10", "train_50"))
  assert len(t10) == 10 and len(t50) == 50 and t10 <= t50 <= train
  assert set(m["subsets"]["train_50"]["tile_ids"]) <= set(m["splits"]["train"]["tile_ids"])
  other = json.loads(
    combine_tile_sets([areas["a"], areas["b"], areas["c"]], tmp_path / "s4", seed=4).read_text()
  )
  assert other["subsets"]["train_10"]["tile_ids"] != m["subsets"]["train_10"]["tile_ids"]


def test_a_held_out_area_is_tested_on_all_its_tiles_and_never_trained_on(areas, tmp_path):
  path = combine_tile_sets([areas["a"], areas["b"]], tmp_path / "loao", test_sets=[areas["c"]])
  m = json.loads(path.read_text())
  c = json.loads(areas["c"].read_text())
  assert m["splits"]["test"]["count"] == sum(
    c["splits"][s]["count"] for s in ("train", "val", "test")
  )
  held = {t["transform"].tobytes() for t in _member_tiles(areas["c"], ["train", "val", "test"])}
  assert {g for g, _ in _read(path, "test")} == held
  assert not held & {g for g, _ in _read(path, "train")} and not held & {
    g for g, _ in _read(path, "val")
  }
  assert [x["role"] for x in m["members"]] == ["train", "train", "test"]
  with pytest.raises(DataError, match="place 'a' is also among the training sets"):
    combine_tile_sets([areas["a"], areas["b"]], tmp_path / "bad", test_sets=[areas["a"]])


def test_mixing_tile_or_cell_sizes_is_refused(areas, tmp_path):
  small = _area(tmp_path, "d", 7, tile=16)
  coarse = _area(tmp_path, "e", 8, cell=2.0)
  with pytest.raises(DataError, match=r"d/tiles/manifest.json: tile_size 16 differs from 32"):
    combine_tile_sets([areas["a"], small], tmp_path / "x")
  with pytest.raises(DataError, match=r"e/tiles/manifest.json: cell size 2 differs from 1"):
    combine_tile_sets([areas["a"]], tmp_path / "x", test_sets=[coarse])
  with pytest.raises(ValueError, match="given twice"):
    combine_tile_sets([areas["a"], areas["a"]], tmp_path / "x")
  assert not (tmp_path / "x").exists()
