"""Training: pmap equivalence, learning, exact resume, checkpoint robustness, preemption."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SHAPE, smooth_field, textured_volume, tiny_config, write_subjects
import vmjax
from vmjax import checkpoints
from vmjax import networks
from vmjax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_batch(count, seed=0):
  moving = np.stack([textured_volume(SHAPE, seed=seed + 2 * i)[0] for i in range(count)])
  fixed = np.stack([textured_volume(SHAPE, seed=seed + 2 * i + 1)[0] for i in range(count)])
  return {"moving": moving, "fixed": fixed}


def test_pmap_step_on_4_devices_equals_single_device_step_on_4_pairs():
  assert jax.local_device_count() == 4, "conftest sets 4 simulated CPU devices"
  config = tiny_config()
  model = networks.model_from_config(config.model)
  state = train.create_train_state(model, config, jax.random.PRNGKey(0), SHAPE)
  batch = random_batch(4)

  single = jax.jit(train.make_train_step(model, config, axis_name=None))
  state_1, metrics_1 = single(state, batch)
  state_1, metrics_1b = single(state_1, batch)

  p_step = jax.pmap(train.make_train_step(model, config), axis_name=train.AXIS)
  per_device = {k: v.reshape(4, 1, *v.shape[1:]) for k, v in batch.items()}
  p_state = flax.jax_utils.replicate(state)
  p_state, p_metrics = p_step(p_state, per_device)
  p_state, p_metrics_b = p_step(p_state, per_device)

  np.testing.assert_allclose(p_metrics_b["loss"][0], metrics_1b["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(state_1.params),
                  jax.tree_util.tree_leaves(p_state.params)):
    np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(b[0], b[3])  # replicas stay identical


def test_loss_goes_down_on_a_small_pair():
  config = tiny_config()
  model = networks.model_from_config(config.model)
  fixed = textured_volume(SHAPE, seed=3)
  disp = jnp.asarray(smooth_field(SHAPE, amplitude=1.5, seed=4))
  moving = np.asarray(vmjax.warp(jnp.asarray(fixed), disp, mode="nearest"))
  batch = {"moving": moving, "fixed": fixed}
  state = train.create_train_state(model, config, jax.random.PRNGKey(0), SHAPE)
  step = jax.jit(train.make_train_step(model, config, axis_name=None))
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["image"]))
  assert losses[-1] < losses[0] - 0.02, losses
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"loss.bidir": True, "model.int_steps": 3, "model.int_downsize": 2},
    {"loss.image": "mse", "loss.lam": 0.01, "loss.seg_weight": 0.5,
     "augment.deform_std": 1.0, "augment.gamma_std": 0.1},
])
def test_loss_variants_give_finite_gradients(overrides):
  config = tiny_config(**overrides)
  model = networks.model_from_config(config.model)
  state = train.create_train_state(model, config, jax.random.PRNGKey(0), SHAPE)
  batch = random_batch(2)
  batch["moving_seg"] = (batch["moving"] > 0.5).astype(np.int32)
  batch["fixed_seg"] = (batch["fixed"] > 0.5).astype(np.int32)
  step = jax.jit(train.make_train_step(model, config, seg_labels=(0, 1), axis_name=None))
  new_state, metrics = step(state, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  if config.loss.seg_weight:
    assert 0.0 <= float(metrics["seg"]) <= 1.0
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.params,
                                   new_state.params)
  assert any(jax.tree_util.tree_leaves(changed))


def params_of(workdir):
  config = tiny_config()
  model = networks.model_from_config(config.model)
  target = train.create_train_state(model, config, jax.random.PRNGKey(0), SHAPE)
  state, meta = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                              config).restore_latest(target)
  return state, meta


@pytest.mark.slow
def test_resume_gives_exactly_the_uninterrupted_parameters(tmp_path):
  data_dir = write_subjects(tmp_path / "data")
  augment = {"augment.deform_std": 1.0, "augment.noise_std": 0.01}
  full = tiny_config(data_dir, num_steps=4, **augment)
  summary = train.train_and_evaluate(full, str(tmp_path / "full"))
  assert "dice" in summary and 0.0 <= summary["dice"] <= 1.0

  train.train_and_evaluate(tiny_config(data_dir, num_steps=2, **augment), str(tmp_path / "cut"))
  _, meta = params_of(tmp_path / "cut")
  assert meta["step"] == 2
  # A run killed after step 4's log line but before its next checkpoint left rows behind.
  with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
    for step in (3, 4):
      f.write(json.dumps({"step": step, "time": 0.0, "train/loss": 123.0}) + "\n")
  train.train_and_evaluate(tiny_config(data_dir, num_steps=4, **augment), str(tmp_path / "cut"))
  rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4] and all(r["train/loss"] != 123.0 for r in rows
                                               if "train/loss" in r)
  config = json.loads((tmp_path / "cut" / "config.json").read_text())
  assert config["num_steps"] == 4 and config["model"]["enc_features"] == [4, 8]

  uninterrupted, meta_a = params_of(tmp_path / "full")
  resumed, meta_b = params_of(tmp_path / "cut")
  assert meta_a["step"] == meta_b["step"] == 4 == int(resumed.step)
  for a, b in zip(jax.tree_util.tree_leaves(uninterrupted), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
  assert any('"train/loss"' in l for l in lines) and any('"val/dice"' in l for l in lines)


@pytest.mark.slow
def test_a_run_builds_its_model_once(tmp_path, monkeypatch):
  data_dir = write_subjects(tmp_path / "data")
  config = tiny_config(data_dir, num_steps=2, checkpoint_every=2, eval_every=2)
  built = []
  build = networks.model_from_config

  def counting(model_cfg):
    built.append(model_cfg)
    return build(model_cfg)

  monkeypatch.setattr(networks, "model_from_config", counting)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(built) == 1 and "dice" in summary  # train, eval, figure: one model


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, monkeypatch):
  data_dir = write_subjects(tmp_path / "data")
  config = tiny_config(data_dir, num_steps=10_000, checkpoint_every=10_000, eval_every=10_000)
  write = train.summaries.MetricWriter.write

  def write_then_preempt(self, step, scalars):
    write(self, step, scalars)
    if step == 3:  # as a TPU preemption notice would, mid-run
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train.summaries.MetricWriter, "write", write_then_preempt)
  previous = signal.getsignal(signal.SIGTERM)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  state, meta = params_of(tmp_path / "run")
  assert meta["step"] == 3 and int(state.step) == 3
  assert signal.getsignal(signal.SIGTERM) is previous  # handler restored


@pytest.mark.slow
def test_smoke_cli_runs_on_4_devices_and_resumes(tmp_path):
  pytest.importorskip("nilearn", reason="configs/smoke.py uses nilearn's MNI152 template "
                      "(pip install -r requirements-demo.txt)")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  workdir = tmp_path / "smoke"
  cmd = [sys.executable, "-m", "experiments.train", "--config=configs/smoke.py",
         f"--workdir={workdir}"]
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "global batch 4 = 1 per device x 4 devices" in first.stderr
  assert "convolutions: " in first.stderr
  # vmjax's own progress, not orbax's INFO chatter (shown with --library_logs).
  assert "checkpoint_manager.py" not in first.stderr, first.stderr[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  assert (workdir / "registration.png").stat().st_size > 10_000  # the held-out pair, drawn
  assert f"example registration drawn to {workdir / 'registration.png'}" in first.stderr
  second = subprocess.run(cmd + ["--config.num_steps=8"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from checkpoint at step 6" in second.stderr
  assert "step 7/8" in second.stderr and "step 1/8" not in second.stderr


@pytest.mark.slow
def test_cli_reports_bad_data_in_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/default.py",
       f"--config.data.train={tmp_path / 'missing' / '*.nii.gz'}", f"--workdir={workdir}"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert errors == [f"vmjax-train: error: no data.train files match {tmp_path / 'missing'}"
                    "/*.nii.gz"], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_cli_names_a_missing_config_file_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/nope.py:steps=2",
       f"--workdir={workdir}"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and errors[0].startswith(
      "vmjax-train: error: --config: no such file configs/nope.py (shipped configs: "), errors
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("flags,message", [
    (["--num_processes=2", "--process_id=1"], "need --coordinator_address"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
     "is not in [0, --num_processes=2)"),
])
@pytest.mark.slow
def test_cli_rejects_incomplete_multi_process_flags(tmp_path, flags, message):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/smoke.py",
       f"--workdir={workdir}", *flags],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_the_run_stops_after_its_patience(tmp_path,
                                                                            monkeypatch):
  data_dir = write_subjects(tmp_path / "data")
  config = tiny_config(data_dir, num_steps=20, checkpoint_every=2, eval_every=100,
                       nonfinite_patience=3)
  sample = train.data_lib.PairSampler.batch

  def nan_from_step_5(self, step, local_devices, per_device):
    batch = sample(self, step, local_devices, per_device)
    if step >= 4:  # the 5th step on: the loss is NaN
      batch["moving"] = np.full_like(batch["moving"], np.nan)
    return batch

  monkeypatch.setattr(train.data_lib.PairSampler, "batch", nan_from_step_5)
  with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps up to step 7"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  # Every checkpoint holds finite parameters, and those of the last good step (4).
  good, meta = params_of(tmp_path / "run")
  assert meta["step"] == 6  # saved mid-streak: its update was skipped
  for leaf in jax.tree_util.tree_leaves(good.params):
    assert np.isfinite(np.asarray(leaf)).all()
  four, _ = checkpoints.CheckpointManager(str(tmp_path / "run" / "checkpoints"),
                                          config).restore_latest(good, step=4)
  for a, b in zip(jax.tree_util.tree_leaves(four.params), jax.tree_util.tree_leaves(good.params)):
    np.testing.assert_array_equal(a, b)
