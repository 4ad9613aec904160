"""Write-then-rename: the output appears whole or not at all, and temporary files never stay."""

import os

import pytest

from vmjax.atomic import atomic_path


def test_success_renames_and_keeps_the_extension(tmp_path):
  target = tmp_path / "sub" / "scan.nii.gz"
  with atomic_path(str(target)) as tmp:
    assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path / "sub")
    assert not target.exists()
    with open(tmp, "w") as f:
      f.write("complete")
  assert target.read_text() == "complete"
  assert os.listdir(tmp_path / "sub") == ["scan.nii.gz"]


def test_failure_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
  target = tmp_path / "results.csv"
  target.write_text("previous")
  with pytest.raises(RuntimeError):
    with atomic_path(str(target)) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("crash mid-write")
  assert target.read_text() == "previous"
  assert os.listdir(tmp_path) == ["results.csv"]


def test_two_writers_of_one_output_get_different_temporary_files(tmp_path):
  target = str(tmp_path / "a.png")
  with atomic_path(target) as first, atomic_path(target) as second:
    assert first != second
