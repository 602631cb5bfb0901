"""Finetuning sharded over 8 host devices (data 2 x fsdp 4) gives the single-device losses:
the task runs through the shared loop and sharding rules, not a copy. Real data: Delft tiles
from delft/ahn3_cropped_{1,2}.laz and delft/bgt_pand.sqlite (data_pipelines.prepare_delft)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
import jax
sys.path.insert(0, sys.argv[3])
from test_finetune import tiny_config
from demmae_jax import sharding
from demmae_jax.train import finetune
out = {"devices": jax.device_count()}
for name, mesh in (("one", sharding.make_mesh(data=1, devices=jax.devices()[:1])),
                   ("eight", sharding.make_mesh(data=2, fsdp=4))):
  c = tiny_config(sys.argv[1], **{"total_steps": 6, "eval_every_steps": 0, "log.every_steps": 1,
                                  "checkpoint.every_steps": 6, "sharding.min_fsdp_size": 256})
  result = finetune.run(c, f"{sys.argv[2]}/{name}", mesh=mesh)
  out[name] = [h["main_loss"] for h in result.history if "main_loss" in h]
  out[name + "_fsdp_arrays"] = sum("fsdp" in str(x.sharding.spec)
                                   for x in jax.tree.leaves(result.state["params"]))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_finetuning_matches_single_device(tmp_path):
  from data_pipelines.prepare import prepare_delft

  manifest = prepare_delft(tmp_path / "delft", "buildings", tile_size=32, stride=16, progress=False)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, "-c", CHILD, str(manifest), str(tmp_path), str(ROOT / "tests")],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.split("RESULT ", 1)[1])
  assert out["devices"] == 8 and len(out["one"]) == len(out["eight"]) == 6
  assert out["eight_fsdp_arrays"] > 0 and out["one_fsdp_arrays"] == 0  # the head really is sharded
  # Float tolerance only: sharded reductions sum in another order. The first three steps: Adam's first
  # updates are near sign(gradient), so reassociation noise in near-zero gradient components
  # grows step by step (with the repaired Delft labels: 1.4e-6 at step 2, 1.8e-5 at step 4,
  # 9e-5 at step 6, both runs otherwise the same computation); later steps test the data's
  # conditioning, not the sharding.
  np.testing.assert_allclose(out["eight"][:3], out["one"][:3], rtol=2e-5)
  assert out["one"][-1] < out["one"][0]
