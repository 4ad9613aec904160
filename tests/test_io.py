"""Scan files: reading NIfTI / MGH / npz with labels and world coordinates, writing them back,
and one clear error naming the file for each bad input."""

import os
import pathlib
import zlib

import jax
import nibabel as nib
import numpy as np
import pytest

from helpers import textured_volume
from vmjax import checks
from vmjax import data
from vmjax import io
from vmjax import kernels

SHAPE = (16, 16, 16)
OBLIQUE = np.array([[0.0, 1.5, 0.1, -80.0], [2.0, 0.0, 0.0, -100.0], [0.0, 0.0, 2.5, -60.0],
                    [0.0, 0.0, 0.0, 1.0]])


def write_nifti(path, array, zooms=(1.0, 1.0, 1.0)):
  affine = np.diag([*zooms, 1.0])
  nib.save(nib.Nifti1Image(array, affine), str(path))


def nifti_volume(tmp_path, name, array, affine):
  path = str(tmp_path / name)
  nib.save(nib.Nifti1Image(array, affine), path)
  return path


def test_reads_npz_and_nifti_with_labels(tmp_path):
  rng = np.random.default_rng(0)
  vol = rng.uniform(size=SHAPE).astype(np.float32)
  seg = rng.integers(0, 4, size=SHAPE).astype(np.int16)
  np.savez(tmp_path / "a.npz", vol=vol, seg=seg)
  write_nifti(tmp_path / "s1_t1.nii.gz", vol, zooms=(2.0, 2.0, 2.0))
  write_nifti(tmp_path / "s1_labels.nii.gz", seg)
  a = io.load_volume(str(tmp_path / "a.npz"))
  np.testing.assert_array_equal(a.image, vol)
  assert a.seg.dtype == np.int32 and (a.seg == seg).all()
  sources = io.resolve_sources(str(tmp_path / "*_t1.nii.gz"), seg_replace=("t1", "labels"))
  assert sources == [(str(tmp_path / "s1_t1.nii.gz"), str(tmp_path / "s1_labels.nii.gz"))]
  b = io.load_volume(*sources[0])
  np.testing.assert_allclose(b.image, vol, rtol=1e-6)
  assert (b.seg == seg).all() and np.allclose(np.diag(b.affine)[:3], 2.0)
  # Directory spec: label files named by the swap are not taken as images.
  assert [s[0] for s in io.resolve_sources(str(tmp_path), ("t1", "labels"))] == [
      str(tmp_path / "a.npz"), str(tmp_path / "s1_t1.nii.gz")]


def test_list_file_with_relative_paths(tmp_path):
  np.savez(tmp_path / "x.npz", vol=np.zeros(SHAPE))
  np.savez(tmp_path / "y.npz", vol=np.ones(SHAPE))
  (tmp_path / "list.txt").write_text("# subjects\nx.npz\n\ny.npz\n")
  assert [p for p, _ in io.resolve_sources(str(tmp_path / "list.txt"))] == [
      str(tmp_path / "x.npz"), str(tmp_path / "y.npz")]


def test_real_oasis_subject_reads_with_labels(shared_data):
  root = shared_data / "oasis_trt20"
  volume = io.load_volume(*io.resolve_sources(str(root / "OASIS-TRT-20-1" / "t1.nii.gz"),
                                                  ("t1", "labels"))[0])
  assert volume.image.shape == (160, 192, 160)
  assert 0 <= volume.image.min() <= volume.image.max() <= 1
  labels = data.read_labels(str(root / "labels.txt"))
  assert len(labels) == 98 and set(labels) <= set(np.unique(volume.seg))


def test_nifti_round_trip_keeps_affine_and_zooms(tmp_path):
  image = textured_volume((10, 11, 12), seed=0)[0, ..., 0]
  src = io.load_volume(nifti_volume(tmp_path, "in.nii.gz", image, OBLIQUE))
  io.save_volume(str(tmp_path / "out.nii.gz"), src.image, like=src)
  io.save_volume(str(tmp_path / "field.nii.gz"), np.zeros((10, 11, 12, 3), np.float32), like=src)
  for name, shape in [("out.nii.gz", (10, 11, 12)), ("field.nii.gz", (10, 11, 12, 3))]:
    out = nib.load(str(tmp_path / name))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(out.header.get_zooms()[:3], nib.load(
        str(tmp_path / "in.nii.gz")).header.get_zooms())
  np.testing.assert_allclose(io.load_volume(str(tmp_path / "out.nii.gz")).image, image,
                             rtol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["field.nii.gz", "in.nii.gz", "out.nii.gz"]  # no temp


def test_mgz_reads_with_its_affine_and_float_labels_are_cast(tmp_path):
  image = textured_volume((10, 11, 12), seed=5)[0, ..., 0]
  seg = np.digitize(image, [0.3, 0.6]).astype(np.float32) * 7  # labels stored as float
  nib.save(nib.MGHImage(image, OBLIQUE), str(tmp_path / "t1.mgz"))
  nib.save(nib.MGHImage(seg, OBLIQUE), str(tmp_path / "labels.mgz"))
  volume = io.load_volume(str(tmp_path / "t1.mgz"), str(tmp_path / "labels.mgz"))
  np.testing.assert_allclose(volume.image, image, rtol=1e-6)
  np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-5)
  assert volume.seg.dtype == np.int32
  np.testing.assert_array_equal(volume.seg, seg.astype(np.int32))
  io.save_volume(str(tmp_path / "out.mgz"), volume.image, like=volume)
  np.testing.assert_allclose(nib.load(str(tmp_path / "out.mgz")).affine, OBLIQUE, atol=1e-5)


@pytest.mark.parametrize("problem,message", [
    ("four_d", r"holds 2 volumes"),
    ("empty", r"is empty \(all zeros\)"),
    ("nan", r"contains NaN"),
    ("singular", r"singular or non-finite affine"),
    ("fractional_labels", r"non-integral values"),
    ("text", r"cannot read image file .*notes.nii.gz"),
    ("extension", r"unsupported extension"),
])
def test_each_bad_input_is_one_clear_error_naming_the_file(tmp_path, problem, message):
  image = textured_volume((8, 9, 10), seed=0)[0, ..., 0]
  path, seg_path = str(tmp_path / "scan.nii.gz"), None
  if problem == "four_d":
    write_nifti(path, np.stack([image, image], axis=-1))
  elif problem == "empty":
    write_nifti(path, np.zeros_like(image))
  elif problem == "nan":
    bad = image.copy()
    bad[1, 2, 3] = np.nan
    write_nifti(path, bad)
  elif problem == "singular":  # nibabel refuses to write one: edit the header's bytes
    path = str(tmp_path / "scan.nii")
    write_nifti(path, image)
    with open(path, "r+b") as f:
      header = nib.Nifti1Header.from_fileobj(f)
      header["srow_y"] = 0.0
      header["sform_code"], header["qform_code"] = 1, 0
      f.seek(0)
      f.write(header.binaryblock)
  elif problem == "fractional_labels":
    write_nifti(path, image)
    seg_path = str(tmp_path / "labels.nii.gz")
    write_nifti(seg_path, image * 3.0)  # an image given as labels
  elif problem == "text":
    path = str(tmp_path / "notes.nii.gz")
    with open(path, "w") as f:
      f.write("not a scan\n")
  elif problem == "extension":
    path = str(tmp_path / "scan.txt")
    with open(path, "w") as f:
      f.write("1 2 3\n")
  with pytest.raises(checks.DataError, match=message) as info:
    io.load_volume(path, seg_path)
  assert os.path.basename(seg_path or path) in str(info.value)


def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path):
  volume = io.Volume(image=np.ones((4, 4, 4), np.float32), seg=None, affine=np.eye(4), path="m")
  io.save_volume(str(tmp_path / "kept.nii.gz"), volume.image, like=volume)
  before = (tmp_path / "kept.nii.gz").read_bytes()
  with pytest.raises(Exception):
    io.save_volume(str(tmp_path / "kept.nii.gz"), np.ones((4, 4, 4), np.complex256), like=volume)
  assert (tmp_path / "kept.nii.gz").read_bytes() == before  # the previous file is intact
  assert os.listdir(tmp_path) == ["kept.nii.gz"]


@pytest.mark.parametrize("shape, dtype", [((37, 9, 5, 3), np.float32), ((17, 6, 11), np.int32),
                                          ((5, 4, 3, 2), np.int32), ((33, 2, 3), np.float32)])
def test_fortran_order_is_numpys_transposition_bit_for_bit(shape, dtype):
  """A jax array on the host in NIfTI's (Fortran) order: the native blocked transposition for
  3-D and 4-D arrays of 4-byte elements (D not a multiple of its 16-layer blocks; int32 bit for
  bit), numpy's values; and back to C order."""
  rng = np.random.default_rng(9)
  array = (rng.normal(size=shape) * 1000).astype(dtype)
  out = io.fortran_order(jax.device_put(array))
  assert out.flags.f_contiguous and out.dtype == dtype
  np.testing.assert_array_equal(out, array)
  assert kernels.reverse_axes_on_host(array) is not None  # the native path, not numpy's
  back = io.c_order(out, dtype)
  assert back.flags.c_contiguous
  np.testing.assert_array_equal(back, array)


def test_a_nifti_scan_loads_c_ordered_with_nibabels_values(tmp_path):
  """NIfTI data is Fortran-ordered as nibabel reads it; a loaded scan is C-ordered float32 with
  the same values (int16 on disk), so that putting it on the device needs no copy."""
  rng = np.random.default_rng(8)
  data = rng.integers(-300, 3000, size=(11, 9, 7)).astype(np.int16)
  path = str(tmp_path / "scan.nii.gz")
  nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 1.4, 1.0])), path)
  assert np.asanyarray(nib.load(path).dataobj).flags.f_contiguous
  volume = io.load_volume(path)
  assert volume.image.flags.c_contiguous and volume.image.dtype == np.float32
  np.testing.assert_array_equal(volume.image, data.astype(np.float32))
  np.testing.assert_array_equal(io.c_order(np.asfortranarray(data), np.float32), data)


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_an_image_is_a_run_length_deflated_gzip_of_the_nifti_bytes(tmp_path, dtype):
  """Images and label maps go through zlib's run-length deflate: any gzip reader gets
  nibabel's own serialisation back, values round-trip, a zero background compresses, and the
  same image gives the same bytes (no time stamp)."""
  rng = np.random.default_rng(5)
  image = np.zeros((40, 41, 42), dtype)
  image[8:30, 9:31, 10:32] = (rng.normal(size=(22, 22, 22)) * 100).astype(dtype)
  paths = [str(tmp_path / f"moved{k}.nii.gz") for k in range(2)]
  for path in paths:
    io.save_volume(path, image)
  data = pathlib.Path(paths[0]).read_bytes()
  import gzip
  with gzip.open(paths[0], "rb") as f:
    raw = f.read()
  assert raw == nib.Nifti1Image(image, np.eye(4)).to_bytes()
  assert zlib.decompress(data, wbits=31) == raw
  assert len(data) < 0.5 * len(raw)
  assert pathlib.Path(paths[1]).read_bytes() == data
  np.testing.assert_array_equal(np.asarray(nib.load(paths[0]).dataobj), image)


@pytest.mark.parametrize("shape", [(9, 10, 11, 3), (33, 34, 35, 3), (20, 21, 22, 1, 3)])
def test_a_field_is_a_plain_gzip_of_the_nifti_bytes(tmp_path, shape):
  # Fields are written as stored gzip blocks, streamed (fast; floats hardly compress): any gzip
  # reader gets nibabel's own serialisation of the image back (gzip checks the CRC-32 and the
  # size), and the values round-trip exactly. Shapes: less than one 64 KiB block, many blocks
  # and a part block, ITK's 5-D field; a C-ordered array (nibabel writes it in F order).
  field = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  path = str(tmp_path / "warp.nii.gz")
  io.save_volume(path, field)
  import gzip
  with gzip.open(path, "rb") as f:
    raw = f.read()
  assert raw == nib.Nifti1Image(field, np.eye(4)).to_bytes()
  assert zlib.decompress(pathlib.Path(path).read_bytes(), wbits=31) == raw
  np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), field)
