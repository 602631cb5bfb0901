"""configs/dem_pretrain.py: every preset builds a valid, locked config; base is the paper's."""

import pytest

from demmae_jax.train.pretrain import model_config
from test_train_support import dem_pretrain_config


@pytest.mark.parametrize("preset", ["tiny", "cpu", "cpu_rasters", "cpu_hr", "base", "large"])
def test_every_preset_gives_a_locked_config_of_a_valid_model(preset):
  c = dem_pretrain_config(preset)
  m = model_config(c.model)
  assert m.in_chans == 1 and m.img_size % m.patch_size == 0
  assert c.global_batch > 0 and c.optim.warmup_steps < c.total_steps
  assert not any("delft" in f for f in c.data.files + c.data.eval_files)  # held out
  assert not set(c.data.files) & set(c.data.eval_files)
  with pytest.raises(AttributeError):
    c.optim.lrr = 1.0  # a typo is an error, not a new key


def test_base_is_the_paper_vit_b16_with_bfloat16_compute():
  m = model_config(dem_pretrain_config("base").model)
  assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size) == (768, 12, 12, 16, 224)
  assert m.dtype == "bfloat16" and m.mask_ratio == 0.75
  assert model_config(dem_pretrain_config("large").model).remat


def test_unknown_preset_and_unknown_model_field_are_errors():
  with pytest.raises(ValueError, match="unknown preset"):
    dem_pretrain_config("bsae")
  c = dem_pretrain_config("tiny")
  with c.unlocked():
    c.model.embed_dimm = 8
  with pytest.raises(TypeError, match="unknown MAE config fields"):
    model_config(c.model)


def test_cpu_hr_is_the_cpu_model_on_the_corpus_normalised_as_finetuning_and_others_unchanged():
  hr, cpu = dem_pretrain_config("cpu_hr"), dem_pretrain_config("cpu_rasters")
  assert hr.model.to_dict() == cpu.model.to_dict() and hr.total_steps == cpu.total_steps
  assert hr.data.corpus == "auto" and hr.data.normalisation.mode == "ndsm"
  # the same metres-to-input scale as finetuning reads nDSM tiles with (configs/finetune.py)
  from demmae_jax import config_files

  unet = config_files.get_config("finetune", "cpu_unet_buildings")
  assert hr.data.normalisation.scale_m == unet.data.normalisation.scale_m == 30.0
  assert not hr.data.files and not hr.data.lidar_files and not hr.data.eval_files  # the corpus's
  for preset in ("tiny", "cpu_rasters", "base", "large"):
    c = dem_pretrain_config(preset)
    assert (
      c.data.corpus == "" and c.data.normalisation.mode == "minmax" and c.data.corpus_tiles == ""
    )


def test_cpu_is_cpu_hr_streamed_from_a_tfrecord_corpus():
  tiles, hr = dem_pretrain_config("cpu"), dem_pretrain_config("cpu_hr")
  assert tiles.model.to_dict() == hr.model.to_dict() and tiles.total_steps == hr.total_steps
  assert (
    tiles.data.corpus_tiles == "auto" and tiles.data.corpus == "" and hr.data.corpus_tiles == ""
  )
  assert tiles.data.normalisation.to_dict() == hr.data.normalisation.to_dict()
  assert tiles.data.corpus_cell_size == hr.data.corpus_cell_size == 0.5
  assert not tiles.data.files and not tiles.data.lidar_files and not tiles.data.eval_files


def test_cpu_rasters_is_the_raster_recipe_the_experiments_measured_with():
  from demmae_jax import config_files

  c = dem_pretrain_config("cpu_rasters")
  files = ("pretrain/N46E008.tif", "pretrain/N49W123.tif", "alexandria/dsm.tif")
  assert c.data.files == files and c.data.eval_files == ("pretrain/N44W072.hgt",)
  assert len(c.data.lidar_files) == 2 and c.data.normalisation.mode == "minmax"
  assert (c.total_steps, c.global_batch, c.model.img_size, c.model.depth) == (1500, 32, 64, 6)
  assert config_files.get_config("experiments", "cpu").pretrain_preset == "cpu_rasters"


@pytest.mark.parametrize("preset", ["base", "large"])
def test_base_and_large_need_a_corpus_and_say_which_flag(preset):
  from demmae_jax.train.pretrain import check_data

  c = dem_pretrain_config(preset)
  with pytest.raises(ValueError, match=r"--config\.data\.corpus_tiles=gs://BUCKET/corpus/\*"):
    check_data(c)
  check_data(c, reads=False)  # a dry run reads no data
  with c.unlocked():
    c.data.corpus_tiles = "gs://bucket/corpus/*"
  check_data(c)


def test_a_renamed_preset_resumes_its_workdir_and_the_old_name_with_new_values_is_refused(
  tmp_path,
):
  """config.json records the preset name; workdirs compare the values, so a raster `cpu` run
  resumes as `cpu_rasters` and a `cpu_tiles` run as `cpu`, but not a raster run as `cpu`."""
  from demmae_jax import workdirs

  def stored(preset, as_name):
    c = dem_pretrain_config(preset)
    with c.unlocked():
      c.preset = as_name
    d = tmp_path / as_name
    d.mkdir()
    (d / workdirs.CONFIG_FILE).write_text(workdirs.config_to_json(c))
    return d

  old_cpu, old_tiles = stored("cpu_rasters", "cpu"), stored("cpu", "cpu_tiles")
  assert workdirs.check_config(old_cpu, dem_pretrain_config("cpu_rasters"))
  assert workdirs.check_config(old_tiles, dem_pretrain_config("cpu"))
  with pytest.raises(workdirs.WorkdirConfigMismatch, match="data.corpus_tiles"):
    workdirs.check_config(old_cpu, dem_pretrain_config("cpu"))
