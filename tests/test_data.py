"""Data reading, preparation, sampling, and one clear error per bad input."""

import numpy as np
import pytest

from vmjax.configs import default
from vmjax import checks
from vmjax import data
from vmjax import io

SHAPE = (16, 16, 16)


def make_config(train, atlas, **data_fields):
  config = default.get_config()
  config.data.train = train
  config.data.atlas = atlas
  config.data.normalize = "none"
  for k, v in data_fields.items():
    config.data[k] = v
  return config


def test_preparation_normalise_downsample_fit():
  image = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
  seg = np.zeros((8, 8, 8), np.int32)
  seg[4:, :, :] = 3
  v = io.Volume(image=image, seg=seg, affine=np.eye(4), path="mem")
  small = data.downsample(v, 2)
  assert small.image.shape == (4, 4, 4)
  np.testing.assert_allclose(small.image[0, 0, 0], image[:2, :2, :2].mean())
  assert set(np.unique(small.seg)) == {0, 3} and np.allclose(np.diag(small.affine)[:3], 2)
  fitted = data.fit_shape(small, (6, 2, 4))
  assert fitted.image.shape == (6, 2, 4)
  np.testing.assert_array_equal(fitted.image[1:5], small.image[:, 1:3, :])
  assert (fitted.image[0] == 0).all()
  norm = data.normalize_intensity(image, "minmax")
  assert norm.min() == 0.0 and norm.max() == 1.0
  assert data.normalize_intensity(image, "percentile").max() == 1.0


@pytest.mark.parametrize("order", ["C", "F"])
def test_foreground_normalisation_divides_by_the_nonzero_percentile(order):
  """"foreground": the 99.5th percentile of the non-zero voxels (numpy's, on them alone) maps
  to 1, everything above is clipped, float32 out; a NIfTI's Fortran-ordered array alike."""
  rng = np.random.default_rng(4)
  image = np.where(rng.uniform(size=(9, 8, 7)) < 0.3, 0.0, rng.gamma(2.0, 50.0, (9, 8, 7)))
  image = np.asarray(image, np.float32, order=order)
  hi = np.percentile(image[image != 0].astype(np.float64), 99.5)
  out = data.normalize_intensity(image, "foreground")
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, np.clip(image / hi, 0.0, 1.0), rtol=1e-6)


def test_sampler_is_deterministic_and_pairs_differ():
  subjects = [io.Volume(image=np.full(SHAPE, i, np.float32), seg=None, affine=np.eye(4),
                          path=str(i)) for i in range(4)]
  sampler = data.PairSampler(subjects, "pairs", None, seed=7)
  np.testing.assert_array_equal(sampler.indices(5, 16), sampler.indices(5, 16))
  assert not np.array_equal(sampler.indices(5, 16), sampler.indices(6, 16))
  pairs = np.concatenate([sampler.indices(s, 16) for s in range(20)])
  assert (pairs[:, 0] != pairs[:, 1]).all()
  batch = sampler.batch(3, local_devices=2, per_device=3)
  assert batch["moving"].shape == (2, 3, *SHAPE, 1) and "moving_seg" not in batch
  other_host = data.PairSampler(subjects, "pairs", None, seed=7, process_index=1)
  assert not np.array_equal(sampler.indices(5, 16), other_host.indices(5, 16))


def test_build_atlas_mode_with_labels_and_validation(tmp_path):
  rng = np.random.default_rng(1)
  for name in ["atlas", "s1", "s2", "v1"]:
    np.savez(tmp_path / f"{name}.npz", vol=rng.uniform(size=SHAPE),
             seg=rng.integers(0, 3, size=SHAPE))
  config = make_config(f"{tmp_path / 's1.npz'},{tmp_path / 's2.npz'}",
                       str(tmp_path / "atlas.npz"), val=str(tmp_path / "v1.npz"))
  dataset = data.build(config, levels=4)
  assert dataset.spatial_shape == SHAPE and dataset.labels == [1, 2]
  assert len(dataset.val_pairs) == 1 and dataset.val_pairs[0][1].path.endswith("atlas.npz")
  batch = dataset.sampler.batch(0, 1, 2)
  assert batch["fixed_seg"].dtype == np.int32
  np.testing.assert_array_equal(batch["fixed"][0, 0, ..., 0], dataset.sampler.atlas.image)


@pytest.mark.parametrize("problem,message", [
    ("missing", "file not found: .*nope.npz"),
    ("unreadable", r"cannot read image file .*bad.nii.gz"),
    ("rank", r"must be a 3-D volume, got shape \(4, 4\)"),
    ("mismatch", r"s2.npz has shape \(16, 16, 8\)"),
    ("empty", "contains no"),
    ("nan", "s1.npz contains NaN"),
    ("indivisible", r"not divisible by 2\*\*4=16; set data.shape, e.g. \(16, 16, 32\)"),
    ("labels", r"labels .*s1.npz shape \(8, 8, 8\) does not match"),
])
def test_bad_data_fails_at_start_with_one_clear_error(tmp_path, problem, message):
  np.savez(tmp_path / "atlas.npz", vol=np.ones(SHAPE))
  train = str(tmp_path / "train")
  (tmp_path / "train").mkdir()
  good = np.random.default_rng(0).uniform(size=SHAPE)
  np.savez(tmp_path / "train" / "s1.npz", vol=good)
  if problem == "missing":
    train = str(tmp_path / "nope.npz")
  elif problem == "unreadable":
    (tmp_path / "train" / "bad.nii.gz").write_bytes(b"this is not a nifti file")
  elif problem == "rank":
    np.savez(tmp_path / "train" / "s2.npz", vol=np.zeros((4, 4)))
  elif problem == "mismatch":
    np.savez(tmp_path / "train" / "s2.npz", vol=np.ones((16, 16, 8)))
  elif problem == "empty":
    (tmp_path / "empty").mkdir()
    train = str(tmp_path / "empty")
  elif problem == "nan":
    bad = good.copy()
    bad[1, 2, 3] = np.nan
    np.savez(tmp_path / "train" / "s1.npz", vol=bad)
  elif problem == "indivisible":
    np.savez(tmp_path / "atlas.npz", vol=np.ones((16, 16, 20)))
    np.savez(tmp_path / "train" / "s1.npz", vol=np.ones((16, 16, 20)))
  elif problem == "labels":
    np.savez(tmp_path / "train" / "s1.npz", vol=good, seg=np.zeros((8, 8, 8)))
  config = make_config(train, str(tmp_path / "atlas.npz"))
  with pytest.raises(checks.DataError, match=message):
    data.build(config, levels=4)


def test_mni152_template_from_nilearn():
  pytest.importorskip("nilearn", reason="nilearn (requirements-demo.txt) ships the template")
  volume = data.load_mni152()
  assert volume.image.shape == (197, 233, 189) and set(np.unique(volume.seg)) == {0, 1, 2}
  # Grey matter surrounds white matter: both are a sizeable part of the brain.
  assert (volume.seg == 1).sum() > 1e5 and (volume.seg == 2).sum() > 1e5
