"""The same run gives the same numbers on 1 device, 8 devices (data x fsdp), 2 processes, and
after a SIGKILL + restart. Data: 32 x 32 crops of matplotlib's real Jacksboro fault DEM."""

import os
import signal
import socket
import time

import numpy as np
import pytest

from test_train_support import read_child, run_tiny, start_child

STEPS = 8
CHILD_TIMEOUT = 300


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted single-device run in this process."""
  losses, params, result = run_tiny(tmp_path_factory.mktemp("ref"), STEPS, checkpoint_every=2)
  assert len(losses) == STEPS and losses[-1] < losses[0]
  return losses, params, sum(h["lr"] for h in result.history if "lr" in h)


def _wait(procs, timeout=CHILD_TIMEOUT):
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{err.decode()[-3000:]}"


def _assert_close(params, ref_params, lr_sum):
  """Parameters agree to float tolerance, except the attention key biases: their gradient is zero
  in exact arithmetic (a constant added to every logit of a softmax row changes nothing), so they
  hold rounding noise that Adam scales to up to ~lr per step; they are only bounded by lr_sum."""
  assert params.keys() == ref_params.keys()
  for k in ref_params:
    a, b = params[k], ref_params[k]
    if k.endswith("attn/qkv/bias"):
      d = a.shape[-1] // 3
      # [depth, 3d] (blocks stacked): the key part is the last axis's middle third
      assert np.abs(a[..., d : 2 * d]).max() <= lr_sum and np.abs(b[..., d : 2 * d]).max() <= lr_sum
      a, b = np.delete(a, np.s_[d : 2 * d], -1), np.delete(b, np.s_[d : 2 * d], -1)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_step_matches_single_device(reference, tmp_path):
  ref_losses, ref_params, lr_sum = reference
  out = tmp_path / "eight"
  _wait(
    [
      start_child(
        {
          "workdir": str(tmp_path / "wd"),
          "steps": STEPS,
          "out": str(out),
          "mesh": {"data": 2, "fsdp": 4},
        },
        num_host_devices=8,
        stdout=-1,
        stderr=-1,
      )
    ]
  )
  info, params = read_child(out)
  assert info["devices"] == 8
  # FSDP really sharded the large matrices over 4 devices.
  assert "fsdp" in info["param_specs"]["blocks/mlp/fc1/kernel"]
  # Float tolerance: sharded reductions sum in another order.
  np.testing.assert_allclose(info["losses"], ref_losses, rtol=2e-5)
  _assert_close(params, ref_params, lr_sum)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_process_distributed_run_matches_single_device(reference, tmp_path):
  ref_losses, ref_params, lr_sum = reference
  coordinator = f"127.0.0.1:{_free_port()}"
  out = tmp_path / "two"
  procs = [
    start_child(
      {
        "workdir": str(tmp_path / "wd"),
        "steps": STEPS,
        "out": str(out),
        "mesh": {"data": 2, "fsdp": 2},
        "coordinator": coordinator,
        "num_processes": 2,
        "process_id": i,
        # above an int32 of bytes: the processes agree on the smallest budget through a 32-bit
        # gather, which once wrapped this to a negative budget
        "memory_limit": "3GiB",
      },
      num_host_devices=2,
      stdout=-1,
      stderr=-1,
    )
    for i in range(2)
  ]
  _wait(procs)
  info, params = read_child(out)
  assert info["devices"] == 4
  np.testing.assert_allclose(info["losses"], ref_losses, rtol=2e-5)
  _assert_close(params, ref_params, lr_sum)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(reference, tmp_path):
  ref_losses, ref_params, lr_sum = reference
  wd = tmp_path / "wd"
  # Slow batches so that the kill lands mid-run, after the checkpoint of step 4.
  victim = start_child(
    {"workdir": str(wd), "steps": STEPS, "checkpoint_every": 2, "delay": 0.5}, stdout=-1, stderr=-1
  )
  deadline = time.time() + CHILD_TIMEOUT
  while not (wd / "checkpoints" / "4").is_dir():
    assert victim.poll() is None, victim.communicate()[1].decode()[-3000:]
    assert time.time() < deadline, "no checkpoint at step 4"
    time.sleep(0.05)
  os.kill(victim.pid, signal.SIGKILL)
  victim.communicate()
  assert victim.returncode == -signal.SIGKILL
  done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert 4 <= max(done) < STEPS, done  # the run really was interrupted
  out = tmp_path / "resumed"
  _wait(
    [
      start_child(
        {"workdir": str(wd), "steps": STEPS, "checkpoint_every": 2, "out": str(out)},
        stdout=-1,
        stderr=-1,
      )
    ]
  )
  info, params = read_child(out)
  assert info["step"] == STEPS
  resumed_from = STEPS - len(info["losses"])
  assert resumed_from >= 4
  assert info["losses"] == ref_losses[resumed_from:]
  for k in ref_params:
    np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)
  # The metrics file holds each step once, the killed run's later steps replaced.
  from demmae_jax.train.reporting import read_jsonl

  steps = [r["step"] for r in read_jsonl(wd / "metrics.jsonl") if "loss" in r]
  assert steps == list(range(1, STEPS + 1))
