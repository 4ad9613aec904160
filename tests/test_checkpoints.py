"""Checkpoints: damaged and unfinished saves are skipped, and a trained model is rebuilt from a
workdir alone (config + parameters, no optimizer or trainer needed)."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SHAPE, textured_volume, tiny_config, write_subjects
import vmjax
from vmjax import checkpoints
from vmjax import networks
from vmjax import train


def test_corrupted_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
  config = tiny_config()
  model = networks.model_from_config(config.model)
  state = train.create_train_state(model, config, jax.random.PRNGKey(0), SHAPE)
  manager = checkpoints.CheckpointManager(str(tmp_path / "ckpt"), config)
  manager.save(1, state)
  later = state.replace(step=jnp.asarray(2, jnp.int32),
                        params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params))
  manager.save(2, later)
  manager.wait_until_finished()
  # Damage every data file of step 2 (truncate to half).
  damaged = 0
  for path in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
      damaged += 1
  assert damaged
  fresh = checkpoints.CheckpointManager(str(tmp_path / "ckpt"), config)
  with caplog.at_level(logging.WARNING):
    restored, meta = fresh.restore_latest(state)
  assert meta["step"] == 1 and int(restored.step) == 0
  assert "step 2" in caplog.text and "unreadable" in caplog.text
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(restored.params)):
    np.testing.assert_array_equal(a, b)


def test_unfinished_save_is_ignored(tmp_path):
  # A save killed mid-way leaves only orbax's temporary directory, which is never restored.
  config = tiny_config()
  model = networks.model_from_config(config.model)
  state = train.create_train_state(model, config, jax.random.PRNGKey(0), SHAPE)
  manager = checkpoints.CheckpointManager(str(tmp_path / "ckpt"), config)
  manager.save(1, state)
  manager.wait_until_finished()
  (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-123").mkdir()
  assert checkpoints.CheckpointManager(str(tmp_path / "ckpt"), config).all_steps() == [1]


@pytest.mark.slow
def test_load_trained_rebuilds_the_model_from_the_workdir(tmp_path):
  data_dir = write_subjects(tmp_path / "data")
  train.train_and_evaluate(tiny_config(data_dir, num_steps=2), str(tmp_path / "run"))
  model, variables, config = checkpoints.load_trained(str(tmp_path / "run"))
  assert tuple(model.enc_features) == (4, 8) and config.num_steps == 2
  x = jnp.asarray(textured_volume((32, 16, 48), seed=1))
  moved, disp = vmjax.register(model, variables, x, x)
  assert disp.shape == (1, 32, 16, 48, 3)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoints.load_trained(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_best_validation_checkpoint_is_kept_and_loadable(tmp_path):
  data_dir = write_subjects(tmp_path / "data")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_config(data_dir, num_steps=6, eval_every=2, keep_checkpoints=1),
                           str(run))
  history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  dice = {r["step"]: r["val/dice"] for r in history if "val/dice" in r}
  assert sorted(dice) == [2, 4, 6]
  best_step = max(dice, key=lambda step: (dice[step], step))  # a tie keeps the newer one
  kept = [int(p.name) for p in (run / checkpoints.BEST).iterdir() if p.name.isdigit()]
  assert kept == [best_step]
  _, best_vars, _ = checkpoints.load_trained(str(run), best=True)
  _, step_vars, _ = checkpoints.load_trained(str(run / checkpoints.BEST / str(best_step)))
  for a, b in zip(jax.tree_util.tree_leaves(best_vars), jax.tree_util.tree_leaves(step_vars)):
    np.testing.assert_array_equal(a, b)
  if best_step != 6:  # the newest checkpoint holds other parameters
    _, latest_vars, _ = checkpoints.load_trained(str(run))
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(
        jax.tree_util.tree_leaves(best_vars), jax.tree_util.tree_leaves(latest_vars)))
