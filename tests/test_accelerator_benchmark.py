"""benchmarks/accelerator.py, the accelerator check, on CPU with the tiny preset: it runs the real
training loop and reports every field, each within sane bounds."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import accelerator  # noqa: E402


def test_tiny_preset_reports_every_field(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(
    sys, "argv", ["accelerator.py", "--presets", "tiny", "--steps", "2", "--workdir", str(tmp_path)]
  )
  assert accelerator.main() == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert set(out) == set(accelerator.FIELDS)
  assert out["preset"] == "tiny" and out["platform"] == "cpu" and out["dtype"] == "bfloat16"
  assert out["global_batch"] == 8 and out["steps_timed"] == 2 and out["grad_accum_steps"] == 1
  assert out["images_per_s"] > 0
  assert out["step_ms"] == pytest.approx(1e3 * out["global_batch"] / out["images_per_s"], rel=0.01)
  # the tiny MAE: 32 px, patch 4, 4 blocks; its jaxpr counts ~35 MFLOP per image (fwd + bwd)
  assert 0.01 < out["gflop_per_image"] < 0.1
  assert 0 < out["mfu"] < 1
  assert 0.1 < out["peak_memory_gib"] < 64 and out["memory_source"] == "process peak RSS"
  assert 0 <= out["input_wait_fraction"] < 0.5 and out["input_wait_ms"] >= 0
  assert out["loss"] == out["loss"]  # finite, not NaN
  assert not list(tmp_path.iterdir())  # the temporary workdir is gone
