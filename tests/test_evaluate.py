"""Evaluation: hand-computed Dice and folding, summaries, and the CLI end to end."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import vmjax
from helpers import textured_volume, tiny_config, write_subjects
from vmjax import evaluation
from vmjax import freesurfer
from vmjax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_dice_and_folding_on_a_hand_made_case():
  fixed = np.zeros((4, 4, 4), np.int32)
  moved = np.zeros_like(fixed)
  fixed[:2] = 17        # 32 voxels
  moved[1:3] = 17       # 32 voxels, 16 shared -> 0.5
  fixed[3, 3, 3] = 53   # 1 voxel, missed -> 0
  np.testing.assert_allclose(evaluation.dice_per_label(moved, fixed, [17, 53]), [0.5, 0.0])
  assert np.isnan(evaluation.dice_per_label(moved, fixed, [99])[0])
  det = np.ones((4, 4, 4))
  det[0, 0, :3] = [-0.5, 0.0, 0.2]  # two non-positive voxels of 64
  assert evaluation.folding_stats(det) == (2, 2 / 64)
  # And the same count from a real field: a reflection folds every voxel.
  grid = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1)
  reflect = np.zeros_like(grid)
  reflect[..., 0] = -2 * grid[..., 0]  # x -> -x
  det = np.asarray(vmjax.jacobian_determinant(reflect[None].astype(np.float32)))[0]
  assert evaluation.folding_stats(det) == (125, 1.0)


def test_summary_means_over_labels_then_pairs():
  records = [{"method": "a", "dice": np.array([1.0, 0.5]), "folding_fraction": 0.0,
              "folding_count": 0, "seconds": 1.0},
             {"method": "a", "dice": np.array([0.5, np.nan]), "folding_fraction": 0.01,
              "folding_count": 10, "seconds": 3.0}]
  s = evaluation.summarize(records)["a"]
  assert s["pairs"] == 2
  np.testing.assert_allclose([s["dice_mean"], s["dice_std"]], [0.625, 0.125])
  np.testing.assert_allclose([s["folding_percent_mean"], s["folding_count_mean"],
                              s["seconds_per_pair"]], [0.5, 5.0, 2.0])


def test_label_names_merge_hemispheres():
  assert freesurfer.label_name(17) == "Left-Hippocampus"
  assert freesurfer.structure_name(17) == freesurfer.structure_name(53) == "Hippocampus"
  assert freesurfer.structure_name(1035) == freesurfer.structure_name(2035) == "ctx-insula"
  assert len(freesurfer.VOXELMORPH_LABELS) == 30
  assert all(l in freesurfer.LABEL_NAMES for l in freesurfer.VOXELMORPH_LABELS)


@pytest.mark.slow
def test_batched_evaluation_gives_each_pair_its_own_result():
  """Pairs of one grid shape go to a batch-capable method together (at most batch_size,
  consecutive); each pair's Dice and folding are those of the one-pair-at-a-time run."""
  import jax
  from vmjax import io
  from vmjax import networks

  shape_of = lambda shapes: [(io.Volume(np.zeros(s), None, np.eye(4), "m"),
                              io.Volume(np.zeros(s), None, np.eye(4), "f")) for s in shapes]
  a, b = (8, 8, 8), (8, 8, 12)
  assert evaluation._batches(shape_of([a, a, a, b, a]), 2) == [[0, 1], [2], [3], [4]]
  assert evaluation._batches(shape_of([a, a]), 1) == [[0], [1]]

  config = tiny_config()
  config.data.normalize = "none"
  model = networks.model_from_config(config.model)
  variables = vmjax.init_variables(model, jax.random.PRNGKey(1), (8, 8, 8))
  variables = jax.tree_util.tree_map(lambda p: p * 3e4 if p.ndim == 5 and p.shape[-1] == 3
                                     else p, variables)
  scans = [textured_volume((16, 12, 16), seed=s)[0, ..., 0] for s in range(4)]
  volumes = [io.Volume(x, np.digitize(x, [0.4, 0.6]).astype(np.int32), np.eye(4), f"s{i}")
             for i, x in enumerate(scans)]
  pairs = [(volumes[i], volumes[(i + 1) % 4]) for i in range(3)]
  method = evaluation.vmjax_method(model, variables, config)
  one = evaluation.evaluate_methods({"vmjax": method}, pairs, [1, 2])
  two = evaluation.evaluate_methods({"vmjax": method}, pairs, [1, 2], batch_size=2)
  assert [r["pair"] for r in two] == [0, 1, 2]
  assert any(r["folding_count"] for r in one) or any(
      np.abs(r["outcome"].disp).max() > 0.5 for r in one)  # a field that does something
  for r1, r2 in zip(one, two):
    np.testing.assert_allclose(r1["dice"], r2["dice"], atol=1e-3)
    assert abs(r1["folding_count"] - r2["folding_count"]) <= 2
    assert r2["seconds"] > 0
  with pytest.raises(ValueError, match="batch_size"):
    evaluation.evaluate_methods({"vmjax": method}, pairs, [1, 2], batch_size=0)


@pytest.mark.slow
def test_evaluate_cli_end_to_end_on_a_tiny_case(tmp_path):
  data_dir = write_subjects(tmp_path / "data", shape=(16, 16, 16))
  train.train_and_evaluate(tiny_config(data_dir, num_steps=2), str(tmp_path / "run"))
  scan = textured_volume((24, 20, 16), seed=5)[0, ..., 0]
  np.savez(tmp_path / "scan.npz", vol=scan, seg=np.digitize(scan, [0.4, 0.6]))
  out = tmp_path / "eval"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path / 'run'}",
       f"--synthetic={tmp_path / 'scan.npz'}", "--num_pairs=2", "--deform_std=1.5",
       "--deform_spacing=8", "--labels=1,2", "--instance_steps=2", f"--outdir={out}",
       "--batch=2",
       "--methods=identity,vmjax,vmjax_instance,ants_syn"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["methods"]) >= {"identity", "vmjax", "vmjax_instance"}
  if not evaluation.ants_available():
    assert "antspyx is not installed" in summary["skipped"]["ants_syn"]
  identity = summary["methods"]["identity"]
  assert identity["folding_percent_mean"] == 0.0 and 0.0 < identity["dice_mean"] < 1.0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  methods = {r["method"] for r in rows}
  assert len(rows) == len(methods) * 2 * 2  # methods x pairs x labels
  assert "identity" in result.stdout and "Dice" in result.stdout
  assert "in one batch" in result.stderr and summary["batch"] == 2
  pytest.importorskip("matplotlib", reason="figures need matplotlib (requirements-demo.txt)")
  assert (out / "fig5_dice.png").stat().st_size > 1000
  assert (out / "fig4_vmjax.png").stat().st_size > 1000
