"""Registering scans: NIfTI round trip, any shape, identity, labels, CLI and its errors."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import vmjax
from helpers import textured_volume, tiny_config, write_subjects
from vmjax import data
from vmjax import io
from vmjax import registration
from vmjax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def nifti_volume(tmp_path, name, array, affine):
  path = str(tmp_path / name)
  nib.save(nib.Nifti1Image(array, affine), path)
  return path


OBLIQUE = np.array([[0.0, 1.5, 0.1, -80.0], [2.0, 0.0, 0.0, -100.0], [0.0, 0.0, 2.5, -60.0],
                    [0.0, 0.0, 0.0, 1.0]])


def test_nifti_round_trip_keeps_affine_and_zooms(tmp_path):
  image = textured_volume((10, 11, 12), seed=0)[0, ..., 0]
  src = data.load_volume(nifti_volume(tmp_path, "in.nii.gz", image, OBLIQUE))
  io.save_volume(str(tmp_path / "out.nii.gz"), src.image, like=src)
  io.save_volume(str(tmp_path / "field.nii.gz"), np.zeros((10, 11, 12, 3), np.float32), like=src)
  for name, shape in [("out.nii.gz", (10, 11, 12)), ("field.nii.gz", (10, 11, 12, 3))]:
    out = nib.load(str(tmp_path / name))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(out.header.get_zooms()[:3], nib.load(
        str(tmp_path / "in.nii.gz")).header.get_zooms())
  np.testing.assert_allclose(data.load_volume(str(tmp_path / "out.nii.gz")).image, image,
                             rtol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["field.nii.gz", "in.nii.gz", "out.nii.gz"]  # no temp


def zero_flow(variables):
  params = jax.tree_util.tree_map(lambda p: p, variables["params"])
  params["flow"] = jax.tree_util.tree_map(jnp.zeros_like, params["flow"])
  return {"params": params}


@pytest.mark.parametrize("downsample", [1, 2])
def test_identity_displacement_reproduces_the_input_exactly_at_any_shape(downsample):
  config = tiny_config()  # 2 levels: the network needs multiples of 4
  config.data.downsample = downsample
  config.data.normalize = "percentile"
  model = train.model_from_config(config.model)
  variables = zero_flow(vmjax.init_variables(model, jax.random.PRNGKey(0), (8, 8, 8)))
  shape = (21, 18, 23)  # not a multiple of 4, nor of the downsampling factor
  image = textured_volume(shape, seed=1)[0, ..., 0] * 300.0
  seg = (image > 150).astype(np.int32) * 5
  moving = data.Volume(image=image, seg=seg, affine=np.eye(4), path="m")
  fixed = data.Volume(image=textured_volume(shape, seed=2)[0, ..., 0], seg=None,
                      affine=np.eye(4), path="f")
  out = registration.register_scans(model, variables, config, moving, fixed)
  assert out["disp"].shape == (*shape, 3) and not np.asarray(out["disp"]).any()
  np.testing.assert_array_equal(out["moved"], image)
  np.testing.assert_array_equal(out["moved_seg"], seg)


def test_grid_mismatch_is_one_clear_error():
  config = tiny_config()
  model = train.model_from_config(config.model)
  variables = vmjax.init_variables(model, jax.random.PRNGKey(0), (8, 8, 8))
  a = data.Volume(image=np.zeros((8, 8, 8), np.float32), seg=None, affine=np.eye(4), path="a")
  b = data.Volume(image=np.zeros((8, 8, 12), np.float32), seg=None, affine=np.eye(4), path="b")
  with pytest.raises(ValueError, match="different voxel grids"):
    registration.register_scans(model, variables, config, a, b)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("trained")
  data_dir = write_subjects(root / "data")
  train.train_and_evaluate(tiny_config(data_dir, num_steps=2), str(root / "run"))
  return root


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.register", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_writes_outputs_on_the_fixed_grid_with_labels_from_the_input(trained_workdir,
                                                                         tmp_path):
  shape = (20, 22, 18)
  image = textured_volume(shape, seed=3)[0, ..., 0]
  seg = np.digitize(image, [0.3, 0.5, 0.7]).astype(np.int16) * 3  # labels 0, 3, 6, 9
  moving = nifti_volume(tmp_path, "m.nii.gz", image, OBLIQUE)
  moving_seg = nifti_volume(tmp_path, "m_seg.nii.gz", seg, OBLIQUE)
  fixed = nifti_volume(tmp_path, "f.nii.gz", textured_volume(shape, seed=4)[0, ..., 0], OBLIQUE)
  out = tmp_path / "out"
  result = run_cli(f"--workdir={trained_workdir / 'run'}", f"--moving={moving}",
                   f"--fixed={fixed}", f"--moving_seg={moving_seg}", f"--moved={out}/moved.nii.gz",
                   f"--warp={out}/warp.nii.gz", f"--moved_seg={out}/moved_seg.nii.gz",
                   "--instance_steps=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "after 3 instance steps" in result.stderr
  moved_seg = nib.load(str(out / "moved_seg.nii.gz"))
  assert set(np.unique(np.asarray(moved_seg.dataobj))) <= {0, 3, 6, 9}
  warp = nib.load(str(out / "warp.nii.gz"))
  assert warp.shape == (*shape, 3)
  for img in (moved_seg, warp, nib.load(str(out / "moved.nii.gz"))):
    np.testing.assert_allclose(img.affine, OBLIQUE, atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("missing", "image file not found: .*absent.nii.gz"),
    ("unreadable", "cannot read image file .*broken.nii.gz"),
    ("grid", "different voxel grids"),
    ("no_checkpoint", "no checkpoints directory in workdir"),
])
def test_cli_bad_inputs_give_one_clear_error(trained_workdir, tmp_path, case, message):
  good = nifti_volume(tmp_path, "good.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
  moving, workdir = good, trained_workdir / "run"
  if case == "missing":
    moving = str(tmp_path / "absent.nii.gz")
  elif case == "unreadable":
    moving = str(tmp_path / "broken.nii.gz")
    pathlib.Path(moving).write_bytes(b"\x1f\x8b not really gzip")
  elif case == "grid":
    moving = nifti_volume(tmp_path, "small.nii.gz", np.zeros((8, 8, 4), np.float32), np.eye(4))
  elif case == "no_checkpoint":
    workdir = tmp_path / "empty_workdir"
    workdir.mkdir()
  result = run_cli(f"--workdir={workdir}", f"--moving={moving}", f"--fixed={good}",
                   f"--moved={tmp_path}/out.nii.gz")
  assert result.returncode != 0
  assert any(re.search(message, line) for line in result.stderr.splitlines()), \
      result.stderr[-2000:]
  assert not (tmp_path / "out.nii.gz").exists()
