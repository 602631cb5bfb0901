"""configs/dem_pretrain.py: every preset builds a valid, locked config; base is the paper's."""

import pytest

from demmae_jax.train.pretrain import model_config
from test_train_support import dem_pretrain_config


@pytest.mark.parametrize("preset", ["tiny", "cpu", "cpu_hr", "cpu_tiles", "base", "large"])
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
  hr, cpu = dem_pretrain_config("cpu_hr"), dem_pretrain_config("cpu")
  assert hr.model.to_dict() == cpu.model.to_dict() and hr.total_steps == cpu.total_steps
  assert hr.data.corpus == "auto" and hr.data.normalisation.mode == "ndsm"
  # the same metres-to-input scale as finetuning reads nDSM tiles with (configs/finetune.py)
  from demmae_jax import config_files

  unet = config_files.get_config("finetune", "cpu_unet_buildings")
  assert hr.data.normalisation.scale_m == unet.data.normalisation.scale_m == 30.0
  assert not hr.data.files and not hr.data.lidar_files and not hr.data.eval_files  # the corpus's
  for preset in ("tiny", "cpu", "base", "large"):
    c = dem_pretrain_config(preset)
    assert (
      c.data.corpus == "" and c.data.normalisation.mode == "minmax" and c.data.corpus_tiles == ""
    )


def test_cpu_tiles_is_cpu_hr_streamed_from_a_tfrecord_corpus():
  tiles, hr = dem_pretrain_config("cpu_tiles"), dem_pretrain_config("cpu_hr")
  assert tiles.model.to_dict() == hr.model.to_dict() and tiles.total_steps == hr.total_steps
  assert (
    tiles.data.corpus_tiles == "auto" and tiles.data.corpus == "" and hr.data.corpus_tiles == ""
  )
  assert tiles.data.normalisation.to_dict() == hr.data.normalisation.to_dict()
  assert tiles.data.corpus_cell_size == hr.data.corpus_cell_size == 0.5
