"""Write-then-rename: the output appears whole or not at all, and temporary files never stay."""

import os
import subprocess
import sys

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


@pytest.mark.slow
def test_two_writers_racing_for_one_output_never_mix(tmp_path):
  """Two processes write the same output at once, over and over, in chunks that interleave:
  every reader sees one writer's whole content (never a mix, never a partial file), and no
  temporary file is left."""
  target = tmp_path / "out.bin"
  script = (
      "import sys\n"
      "from vmjax.atomic import atomic_path\n"
      "byte = sys.argv[2].encode()\n"
      "for _ in range(200):\n"
      "  with atomic_path(sys.argv[1]) as tmp:\n"
      "    with open(tmp, 'wb') as f:\n"
      "      for _ in range(64):\n"
      "        f.write(byte * 1024)\n"
      "        f.flush()\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  writers = [subprocess.Popen([sys.executable, "-c", script, str(target), b], cwd=root)
             for b in "ab"]
  seen = set()
  while any(w.poll() is None for w in writers):
    try:
      content = target.read_bytes()
    except FileNotFoundError:
      continue
    assert len(content) == 64 * 1024 and len(set(content)) == 1, "a mixed or partial file"
    seen.add(content[:1])
  assert [w.returncode for w in writers] == [0, 0]
  assert len(target.read_bytes()) == 64 * 1024 and len(set(target.read_bytes())) == 1
  assert os.listdir(tmp_path) == ["out.bin"]
  assert seen  # the reader did see the file while both wrote
