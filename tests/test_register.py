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
from helpers import smooth_field, textured_volume, tiny_config, write_subjects
from vmjax import io
from vmjax import metrics
from vmjax import networks
from vmjax import registration
from vmjax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def nifti_volume(tmp_path, name, array, affine):
  path = str(tmp_path / name)
  nib.save(nib.Nifti1Image(array, affine), path)
  return path


OBLIQUE = np.array([[0.0, 1.5, 0.1, -80.0], [2.0, 0.0, 0.0, -100.0], [0.0, 0.0, 2.5, -60.0],
                    [0.0, 0.0, 0.0, 1.0]])


def zero_flow(variables):
  params = jax.tree_util.tree_map(lambda p: p, variables["params"])
  params["flow"] = jax.tree_util.tree_map(jnp.zeros_like, params["flow"])
  return {"params": params}


@pytest.mark.parametrize("downsample", [1, 2])
def test_identity_displacement_reproduces_the_input_exactly_at_any_shape(downsample):
  config = tiny_config()  # 2 levels: the network needs multiples of 4
  config.data.downsample = downsample
  config.data.normalize = "percentile"
  model = networks.model_from_config(config.model)
  variables = zero_flow(vmjax.init_variables(model, jax.random.PRNGKey(0), (8, 8, 8)))
  shape = (21, 18, 23)  # not a multiple of 4, nor of the downsampling factor
  image = textured_volume(shape, seed=1)[0, ..., 0] * 300.0
  seg = (image > 150).astype(np.int32) * 5
  moving = io.Volume(image=image, seg=seg, affine=np.eye(4), path="m")
  fixed = io.Volume(image=textured_volume(shape, seed=2)[0, ..., 0], seg=None,
                      affine=np.eye(4), path="f")
  out = registration.register_aligned_volumes(model, variables, config, moving, fixed)
  assert out["disp"].shape == (*shape, 3) and not np.asarray(out["disp"]).any()
  np.testing.assert_array_equal(out["moved"], image)
  np.testing.assert_array_equal(out["moved_seg"], seg)


def test_grid_mismatch_is_one_clear_error():
  config = tiny_config()
  model = networks.model_from_config(config.model)
  variables = vmjax.init_variables(model, jax.random.PRNGKey(0), (8, 8, 8))
  a = io.Volume(image=np.zeros((8, 8, 8), np.float32), seg=None, affine=np.eye(4), path="a")
  b = io.Volume(image=np.zeros((8, 8, 12), np.float32), seg=None, affine=np.eye(4), path="b")
  with pytest.raises(ValueError, match="different voxel grids"):
    registration.register_aligned_volumes(model, variables, config, a, b)


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


@pytest.mark.slow
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
                   "--instance_steps=3", "--affine=none", "--dtype=bfloat16", "--profile")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "after 3 instance steps" in result.stderr
  # The process ends without the interpreter's teardown: the last log line and the stage table
  # (stdout) are there all the same.
  assert "done in" in result.stderr.strip().splitlines()[-1]
  assert result.stdout.rstrip().splitlines()[-1].startswith("| total |")
  assert "network computes in bfloat16" in result.stderr
  moved_seg = nib.load(str(out / "moved_seg.nii.gz"))
  assert set(np.unique(np.asarray(moved_seg.dataobj))) <= {0, 3, 6, 9}
  warp = nib.load(str(out / "warp.nii.gz"))
  assert warp.shape == (*shape, 3)
  for img in (moved_seg, warp, nib.load(str(out / "moved.nii.gz"))):
    np.testing.assert_allclose(img.affine, OBLIQUE, atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("missing", "image file not found: .*absent.nii.gz"),
    ("unreadable", "cannot read image file .*broken.nii.gz"),
    ("text", "image file .*notes.txt has an unsupported extension"),
    ("empty", r"image .*empty.nii.gz is empty \(all zeros\)"),
    ("four_d", r"image .*series.nii.gz holds 3 volumes"),
    ("grid", "--affine=none needs both scans on one voxel grid"),
    ("no_checkpoint", "no checkpoints directory in workdir"),
])
@pytest.mark.slow
def test_cli_bad_inputs_give_one_clear_error(trained_workdir, tmp_path, case, message):
  good = nifti_volume(tmp_path, "good.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
  moving, workdir = good, trained_workdir / "run"
  if case == "missing":
    moving = str(tmp_path / "absent.nii.gz")
  elif case == "unreadable":
    moving = str(tmp_path / "broken.nii.gz")
    pathlib.Path(moving).write_bytes(b"\x1f\x8b not really gzip")
  elif case == "text":
    moving = str(tmp_path / "notes.txt")
    pathlib.Path(moving).write_text("a text file\n")
  elif case == "empty":
    moving = nifti_volume(tmp_path, "empty.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
  elif case == "four_d":
    moving = nifti_volume(tmp_path, "series.nii.gz", np.ones((8, 8, 8, 3), np.float32),
                          np.eye(4))
  elif case == "grid":
    moving = nifti_volume(tmp_path, "small.nii.gz", np.ones((8, 8, 4), np.float32), np.eye(4))
  elif case == "no_checkpoint":
    workdir = tmp_path / "empty_workdir"
    workdir.mkdir()
  result = run_cli(f"--workdir={workdir}", f"--moving={moving}", f"--fixed={good}",
                   f"--moved={tmp_path}/out.nii.gz", "--affine=none")
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out.nii.gz").exists()


def dice(a, b, labels):
  return np.nanmean([2 * ((a == l) & (b == l)).sum() / ((a == l).sum() + (b == l).sum())
                     for l in labels])


def test_native_scans_register_with_the_shipped_model(shared_data, tmp_path):
  """Two subjects as acquired (256x256x160 ASL, raw intensities, float labels), no workdir: the
  shipped model with its affine step and (fewer than the default) instance steps; outputs on the fixed grid; labels overlap better than
  after the affine step alone, which overlaps better than the unaligned scans."""
  root = shared_data / "oasis_trt20_native"
  moving, fixed = root / "OASIS-TRT-20-13", root / "OASIS-TRT-20-1"
  out = tmp_path / "out"
  result = run_cli(f"--moving={moving / 't1.nii.gz'}", f"--fixed={fixed / 't1.nii.gz'}",
                   f"--moving_seg={moving / 'labels.nii.gz'}", f"--moved={out}/moved.nii.gz",
                   f"--moved_seg={out}/moved_seg.nii.gz", f"--warp={out}/warp.nii.gz",
                   f"--warp_ants={out}/warp_ants.nii.gz",
                   f"--warp_ants_inverse={out}/inverse_ants.nii.gz", "--instance_steps=10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "after 10 instance steps on the field" in result.stderr
  fixed_img = nib.load(str(fixed / "t1.nii.gz"))
  for name in ("moved", "moved_seg", "warp", "warp_ants"):
    img = nib.load(str(out / f"{name}.nii.gz"))
    assert img.shape[:3] == fixed_img.shape
    np.testing.assert_allclose(img.affine, fixed_img.affine, atol=1e-4)
  labels = [int(l) for l in (shared_data / "oasis_trt20" / "labels.txt").read_text().split()]
  fixed_seg = np.rint(np.asarray(nib.load(str(fixed / "labels.nii.gz")).dataobj)).astype(int)
  moving_seg = np.rint(np.asarray(nib.load(str(moving / "labels.nii.gz")).dataobj)).astype(int)
  moved_seg = np.asarray(nib.load(str(out / "moved_seg.nii.gz")).dataobj)
  assert set(np.unique(moved_seg)) <= set(np.unique(moving_seg))
  before, after = dice(moving_seg, fixed_seg, labels), dice(moved_seg, fixed_seg, labels)
  assert after > before + 0.2, (before, after)
  # vmjax-apply with the ANTs-format field reproduces the moved labels.
  applied = subprocess.run(
      [sys.executable, "-m", "experiments.apply", f"--warp={out}/warp_ants.nii.gz",
       f"--input={moving / 'labels.nii.gz'}", f"--output={out}/applied.nii.gz", "--labels"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert applied.returncode == 0, applied.stderr[-2000:]
  agree = (np.asarray(nib.load(str(out / "applied.nii.gz")).dataobj) == moved_seg).mean()
  assert agree > 0.999, agree
  # The inverse field (on the moving grid) takes mapped brain points back where they came from.
  forward, inverse = (nib.load(str(out / f"{n}.nii.gz")) for n in ("warp_ants", "inverse_ants"))
  assert inverse.shape[:3] == moving_seg.shape
  rng = np.random.default_rng(0)
  brain = np.argwhere(fixed_seg > 0)
  x = brain[rng.choice(len(brain), 2000, replace=False)]
  lps = np.array([-1.0, -1.0, 1.0])
  p = (x @ fixed_img.affine[:3, :3].T + fixed_img.affine[:3, 3]) * lps
  q = p + np.asarray(forward.dataobj)[x[:, 0], x[:, 1], x[:, 2], 0]
  inv_affine = np.linalg.inv(inverse.affine)
  y = np.rint((q * lps) @ inv_affine[:3, :3].T + inv_affine[:3, 3]).astype(int)
  back = q + np.asarray(inverse.dataobj)[y[:, 0], y[:, 1], y[:, 2], 0]
  assert np.median(np.linalg.norm(back - p, axis=1)) < 1.0  # mm; nearest-voxel lookup


def _known_deformation():
  """A 32^3 textured scan and that scan warped by a known smooth field, and a tiny
  diffeomorphic model whose network predicts no motion: ``(model, variables, config, moving,
  fixed, truth)``."""
  shape = (32, 32, 32)
  config = tiny_config()
  config.data.normalize = "none"
  config.model.int_steps, config.model.int_downsize = 7, 2
  config.loss.lam = 0.1
  model = networks.model_from_config(config.model)
  variables = zero_flow(vmjax.init_variables(model, jax.random.PRNGKey(0), (8, 8, 8)))
  image = textured_volume(shape, seed=5, batch=1)
  truth = smooth_field(shape, amplitude=2.0, seed=6)
  fixed_image = np.asarray(vmjax.warp(jnp.asarray(image), jnp.asarray(truth)))[0, ..., 0]
  moving = io.Volume(image=image[0, ..., 0], seg=None, affine=np.eye(4), path="m")
  fixed = io.Volume(image=fixed_image, seg=None, affine=np.eye(4), path="f")
  return model, variables, config, moving, fixed, truth


@pytest.mark.parametrize("target,lr,coarse,steps,tol", [
    ("field", None, (), 150, 0.0),
    ("field", None, (), 150, 0.02),  # stopped by the convergence rule
    pytest.param("network", 3e-3, (), 150, 0.0, marks=pytest.mark.slow),  # fine-tunes the network
    ("field", None, ((4, 60), (2, 60)), 30, 0.0)])
def test_instance_optimisation_recovers_a_known_deformation(target, lr, coarse, steps, tol):
  """The fixed scan is the moving one warped by a known smooth field; starting from a network
  that predicts no motion, instance optimisation must move most of the way to that field, lower
  the pair's loss and keep the (diffeomorphic) field free of folds: at full resolution, and
  coarse to fine (most steps on images pooled 4x and 2x, the correction integrated there)."""
  model, variables, config, moving, fixed, truth = _known_deformation()
  instance = registration.InstanceOptimisation(steps=steps, lr=lr, target=target,
                                               coarse=coarse, tol=tol)
  out = registration.register_aligned_volumes(model, variables, config, moving, fixed, instance)
  inner = (slice(4, -4),) * 3  # away from the border, where the image leaves the volume
  error = np.abs(np.asarray(out["disp"]) - truth[0])[inner].mean()
  assert out["loss_after"] < 0.9 * out["loss_before"]
  assert error < 0.5 * np.abs(truth[0][inner]).mean(), error
  assert float(metrics.jacobian_determinant(out["disp"][None]).min()) > 0
  # The loss before is the network's field's, however it was obtained (with a full-size first
  # level and a tolerance, from the refinement's first step).
  network = registration.register_aligned_volumes(model, variables, config, moving, fixed,
                                                  registration.InstanceOptimisation())
  np.testing.assert_allclose(out["loss_before"], network["loss_after"], rtol=1e-5)


def _numpy_adam_until(x, target, steps, lr, tol, window, nesterov=False):
  """Adam (optax's defaults: b1 0.9, b2 0.999, eps 1e-8) on sum((x - target)^4) and the
  convergence rule, written out in numpy: (x, steps taken). ``nesterov``: NAdam (Dozat 2016),
  the momentum's bias-corrected look-ahead plus the current gradient's share."""
  m = np.zeros_like(x)
  v = np.zeros_like(x)
  history = []
  for k in range(steps):
    value = np.sum((x - target) ** 4)
    grad = 4 * (x - target) ** 3
    history.append(value)
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad ** 2
    t = k + 1
    m_hat = (0.9 * m / (1 - 0.9 ** (t + 1)) + 0.1 * grad / (1 - 0.9 ** t) if nesterov
             else m / (1 - 0.9 ** t))
    x = x - lr * m_hat / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    if tol and k >= window and history[k - window] - value < tol * (history[0] - value):
      return x, k + 1
  return x, steps


@pytest.mark.parametrize("optimiser", ["Adam", "NAdam"])
@pytest.mark.parametrize("tol", [0.0, 0.05, 0.2])
def test_the_convergence_rule_stops_where_a_numpy_adam_does(tol, optimiser):
  """_adam with a tolerance stops at the step the rule, written out in numpy, names (the last
  CONVERGENCE_WINDOW steps gained less than tol of the decrease so far), with the same iterate;
  without one it takes every step. Adam and NAdam (the field's refinement) alike."""
  target = np.linspace(-1.0, 2.0, 7)
  x0 = np.zeros(7)
  window = registration.CONVERGENCE_WINDOW
  loss = lambda x: jnp.sum((x - jnp.asarray(target, jnp.float32)) ** 4)
  x, taken, start = jax.jit(lambda x: registration._adam(loss, 200, x, 0.05, tol, optimiser))(
      jnp.asarray(x0, jnp.float32))
  expected, expected_taken = _numpy_adam_until(x0, target, 200, 0.05, tol, window,
                                               nesterov=optimiser == "NAdam")
  assert int(taken) == expected_taken
  # With the rule, the loss at the start comes back from the first step (none without).
  if tol:
    np.testing.assert_allclose(start, np.sum((x0 - target) ** 4), rtol=1e-6)
  else:
    assert start is None
  assert (expected_taken < 200) == (tol > 0)  # the rule does stop this slow tail
  np.testing.assert_allclose(x, expected, atol=1e-4)


def test_each_item_of_a_batch_stops_where_it_would_alone():
  """With a vector loss (a batch of independent items), each item stops at its own step, with
  the iterate a numpy Adam of that item alone reaches, while the others go on."""
  window = registration.CONVERGENCE_WINDOW
  targets = np.stack([np.linspace(-1.0, 2.0, 7), np.linspace(0.5, 0.6, 7),
                      np.linspace(-3.0, 3.0, 7)])
  loss = lambda x: jnp.sum((x - jnp.asarray(targets, jnp.float32)) ** 4, axis=1)
  x, taken, start = jax.jit(lambda x: registration._adam(loss, 300, x, 0.05, 0.05))(
      jnp.zeros((3, 7), jnp.float32))
  np.testing.assert_allclose(start, np.sum(targets ** 4, axis=1), rtol=1e-6)
  expected = [_numpy_adam_until(np.zeros(7), t, 300, 0.05, 0.05, window) for t in targets]
  assert [int(k) for k in taken] == [k for _, k in expected]
  assert len({k for _, k in expected}) == 3  # they do stop at different steps
  np.testing.assert_allclose(x, np.stack([e for e, _ in expected]), atol=1e-4)


def test_refinement_with_a_tolerance_stops_early_and_recovers_the_deformation():
  """On a known smooth deformation the converged refinement takes fewer steps than its cap,
  reports them, and lands within a fifth of the motion from the truth (the full 150 steps:
  test_instance_optimisation_recovers_a_known_deformation)."""
  model, variables, config, moving, fixed, truth = _known_deformation()
  out = registration.register_aligned_volumes(
      model, variables, config, moving, fixed,
      registration.InstanceOptimisation(steps=300, tol=0.02), warp=False)
  inner = (slice(4, -4),) * 3
  error = np.abs(np.asarray(out["disp"]) - truth[0])[inner].mean()
  motion = np.abs(truth[0][inner]).mean()
  assert 0 < out["steps"] < 300, out["steps"]
  assert error < 0.2 * motion, (error, out["steps"], motion)
  assert out["loss_after"] < 0.9 * out["loss_before"]


@pytest.mark.slow
@pytest.mark.parametrize("steps,tol", [(0, 0.0), (10, 0.0), (60, 0.05)])
def test_a_batch_of_pairs_registers_each_pair_as_alone(steps, tol):
  """register_aligned_volume_batch (one network call, one refinement for all pairs) gives every
  pair the result it gets alone: field, moved image, labels, losses, steps (with a tolerance
  each pair stops where it stops alone); a shape mismatch is refused."""
  shape = (16, 16, 16)
  config = tiny_config()
  config.data.normalize = "none"
  config.model.int_steps, config.model.int_downsize = 5, 2
  model = networks.model_from_config(config.model)
  variables = vmjax.init_variables(model, jax.random.PRNGKey(3), (8, 8, 8))
  # A flow layer large enough that the field is far from zero.
  variables = jax.tree_util.tree_map(lambda p: p * 3e4 if p.ndim == 5 and p.shape[-1] == 3
                                     else p, variables)
  volumes = [io.Volume(image=textured_volume(shape, seed=s)[0, ..., 0],
                       seg=(textured_volume(shape, seed=s)[0, ..., 0] > 0.5).astype(np.int32),
                       affine=np.eye(4), path=f"s{s}") for s in range(4)]
  pairs = [(volumes[0], volumes[1]), (volumes[2], volumes[3]), (volumes[1], volumes[2])]
  instance = registration.InstanceOptimisation(steps=steps, tol=tol)
  batch = registration.register_aligned_volume_batch(model, variables, config, pairs, instance)
  assert len(batch) == 3
  for (moving, fixed), out in zip(pairs, batch):
    alone = registration.register_aligned_volumes(model, variables, config, moving, fixed,
                                                  instance)
    assert float(np.abs(np.asarray(alone["disp"])).max()) > 0.1
    np.testing.assert_allclose(out["disp"], alone["disp"], atol=2e-4)
    np.testing.assert_allclose(out["moved"], alone["moved"], atol=2e-4)
    assert np.mean(np.asarray(out["moved_seg"]) != np.asarray(alone["moved_seg"])) < 1e-3
    np.testing.assert_allclose([out["loss_before"], out["loss_after"]],
                               [alone["loss_before"], alone["loss_after"]], rtol=1e-4)
    assert out["steps"] == alone["steps"]
  if tol:
    print("steps taken", [out["steps"] for out in batch])
  other = io.Volume(image=np.zeros((16, 16, 20), np.float32), seg=None, affine=np.eye(4),
                    path="other")
  with pytest.raises(ValueError, match="one grid shape"):
    registration.register_aligned_volume_batch(model, variables, config,
                                               pairs[:1] + [(other, other)])


def test_instance_optimisation_settings_are_checked():
  with pytest.raises(ValueError, match="target must be one of"):
    registration.InstanceOptimisation(steps=3, target="weights")
  with pytest.raises(ValueError, match="steps must be >= 0"):
    registration.InstanceOptimisation(steps=-1)
  with pytest.raises(ValueError, match="smoothness weight must be >= 0"):
    registration.InstanceOptimisation(steps=1, lam=-0.5)
  assert registration.InstanceOptimisation(target="network").learning_rate == (
      registration.INSTANCE_LR["network"])
  config = tiny_config()
  config.loss.lam = 0.7
  lam = lambda **kw: registration.InstanceOptimisation(**kw).loss_config(config).lam
  assert lam(steps=5) == registration.INSTANCE_LAM["field"]
  assert lam(steps=5, lam=0.3) == 0.3
  assert lam(steps=5, target="network") == 0.7  # the training's weight
  assert lam(steps=0) == 0.7  # no optimisation: the loss reported is the training's
  assert lam(steps=0, coarse=((2, 5),)) == registration.INSTANCE_LAM["field"]
  with pytest.raises(ValueError, match="power-of-two"):
    registration.InstanceOptimisation(steps=1, coarse=((3, 5),))
  with pytest.raises(ValueError, match="not the network"):
    registration.InstanceOptimisation(steps=1, coarse=((2, 5),), target="network")
  with pytest.raises(ValueError, match="tolerance must be in"):
    registration.InstanceOptimisation(steps=1, tol=1.5)
  with pytest.raises(ValueError, match="not the network's fine-tuning"):
    registration.InstanceOptimisation(steps=1, tol=0.1, target="network")
  schedule = registration.InstanceOptimisation(steps=4, coarse=((4, 2), (2, 0))).schedule
  assert schedule == ((4, 2), (1, 4))
