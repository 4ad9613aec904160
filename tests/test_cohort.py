"""Cohort registration (vmjax/cohort.py, ``vmjax-register --pairs/--outdir``): pair lists,
names, shards, results rows; the command's per-pair outputs, failures that do not stop a study,
resumption after SIGTERM / SIGKILL, and two processes splitting one list."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from helpers import textured_volume, tiny_config, write_subjects
from vmjax import cohort
from vmjax import train
from vmjax.checks import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pair_list_resolves_paths_names_pairs_and_refuses_bad_lists(tmp_path):
  (tmp_path / "list.csv").write_text(
      "moving,fixed,moving_seg,fixed_seg,name\n"
      "a/t1.nii.gz,atlas.nii.gz,a/seg.nii.gz,atlas_seg.nii.gz,\n"
      "b/t1.nii.gz,atlas.nii.gz,,,\n"
      "/abs/c.mgz,atlas.nii.gz,,,custom name\n")
  pairs = cohort.read_pair_list(str(tmp_path / "list.csv"))
  assert [p.name for p in pairs] == ["a_t1", "b_t1", "custom-name"]
  assert pairs[0].moving == str(tmp_path / "a/t1.nii.gz")
  assert pairs[0].fixed_seg == str(tmp_path / "atlas_seg.nii.gz")
  assert pairs[1].moving_seg is None and pairs[2].moving == "/abs/c.mgz"
  (tmp_path / "bad.csv").write_text("source,target\nx,y\n")
  with pytest.raises(DataError, match=r"bad.csv.*no column moving, fixed"):
    cohort.read_pair_list(str(tmp_path / "bad.csv"))
  (tmp_path / "dup.csv").write_text("moving,fixed,name\nx,y,n\nz,y,n\n")
  with pytest.raises(DataError, match="repeated: n"):
    cohort.read_pair_list(str(tmp_path / "dup.csv"))
  with pytest.raises(DataError, match="missing.csv"):
    cohort.read_pair_list(str(tmp_path / "missing.csv"))


def test_names_are_stems_made_unique():
  assert cohort.unique_names(["/d/s1.nii.gz", "/d/s2.mgz"]) == ["s1", "s2"]
  assert cohort.unique_names(["/x/sub1/t1.nii.gz", "/x/sub2/t1.nii.gz"]) == ["sub1_t1",
                                                                             "sub2_t1"]
  assert cohort.unique_names(["/a/s/t1.nii", "/b/s/t1.nii"]) == ["s_t1", "s_t1_2"]


def test_shards_are_disjoint_and_cover_the_list():
  pairs = [cohort.Pair(f"p{i}", "m", "f") for i in range(11)]
  shards = [cohort.shard(pairs, k, 3) for k in range(3)]
  names = [p.name for s in shards for p in s]
  assert sorted(names) == sorted(p.name for p in pairs) and len(set(names)) == 11
  assert cohort.parse_shard("2/4") == (2, 4)
  for bad in ("4/4", "1", "a/b", "-1/3"):
    with pytest.raises(ValueError, match="K/N"):
      cohort.parse_shard(bad)


def test_results_keep_the_last_row_of_each_pair_and_done_needs_every_file(tmp_path):
  pair = cohort.Pair("p", "m", "f", moving_seg="ms")
  cohort.append_result(str(tmp_path), {"name": "p", "status": "failed", "error": "x, y"})
  assert not cohort.is_done(str(tmp_path), pair, cohort.read_results(str(tmp_path)))
  cohort.append_result(str(tmp_path), {"name": "p", "status": "ok", "seconds": 1.5})
  rows = cohort.read_results(str(tmp_path))
  assert rows["p"]["status"] == "ok" and rows["p"]["error"] == ""
  outputs = cohort.pair_outputs(str(tmp_path), pair)
  assert set(outputs) == {"moved", "warp", "moved_seg"}
  os.makedirs(tmp_path / "p")
  for path in list(outputs.values())[:-1]:
    open(path, "w").close()
  assert not cohort.is_done(str(tmp_path), pair, rows)  # one file missing
  open(list(outputs.values())[-1], "w").close()
  assert cohort.is_done(str(tmp_path), pair, rows)
  with open(cohort.results_path(str(tmp_path))) as f:
    assert len(list(csv.DictReader(f))) == 2  # the header once
  (tmp_path / "p" / ".tmp-abc.nii.gz").write_bytes(b"half")  # what a SIGKILL leaves
  cohort.remove_stale_temporaries(str(tmp_path), pair)
  assert sorted(os.listdir(tmp_path / "p")) == ["moved.nii.gz", "moved_seg.nii.gz", "warp.nii.gz"]


# The command on small scans with a tiny trained model (scans on one grid: --affine=none).

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("cohort")
  train.train_and_evaluate(tiny_config(write_subjects(root / "data"), num_steps=2),
                           str(root / "run"))
  shape = (20, 22, 18)
  affine = np.diag([1.5, 1.0, 2.0, 1.0])
  scans = root / "scans"
  scans.mkdir()
  for i in range(12):
    image = textured_volume(shape, seed=10 + i)[0, ..., 0]
    nib.save(nib.Nifti1Image(image, affine), str(scans / f"s{i}.nii.gz"))
    nib.save(nib.Nifti1Image(np.digitize(image, [0.4, 0.6]).astype(np.int16), affine),
             str(scans / f"s{i}_seg.nii.gz"))
  return root


def _pair_list(root, path, rows):
  with open(path, "w") as f:
    f.write("moving,fixed,moving_seg,fixed_seg\n")
    for m, fx in rows:
      f.write(f"{m},{root / 'scans' / 's0.nii.gz'},{m.replace('.nii.gz', '_seg.nii.gz')},"
              f"{root / 'scans' / 's0_seg.nii.gz'}\n")
  return path


def _command(trained, pairs, outdir, *extra):
  return [sys.executable, "-m", "experiments.register", f"--workdir={trained / 'run'}",
          f"--pairs={pairs}", f"--outdir={outdir}", "--affine=none", "--instance_steps=2", *extra]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _rows(outdir):
  with open(os.path.join(outdir, "results.csv")) as f:
    return list(csv.DictReader(f))


def _dice(a, b):
  labels = [v for v in np.unique(b) if v]
  return np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v))
                  for v in labels])


@pytest.mark.slow
def test_a_cohort_registers_every_pair_and_a_bad_subject_is_a_failed_row(trained, tmp_path):
  scans = trained / "scans"
  (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti file at all")
  good = [str(scans / f"s{i}.nii.gz") for i in (1, 2, 3)]
  pairs = _pair_list(trained, tmp_path / "pairs.csv",
                     [(m, None) for m in good] + [(str(tmp_path / "corrupt.nii.gz"), None),
                                                  (str(tmp_path / "missing.nii.gz"), None)])
  # labels of the two bad rows must exist or their error would name the label file instead
  for name in ("corrupt", "missing"):
    nib.save(nib.Nifti1Image(np.zeros((20, 22, 18), np.int16), np.eye(4)),
             str(tmp_path / f"{name}_seg.nii.gz"))
  out = tmp_path / "out"
  result = subprocess.run(_command(trained, pairs, out), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 3, result.stderr[-3000:]
  rows = {r["name"]: r for r in _rows(out)}
  assert sorted(rows) == ["corrupt", "missing", "s1", "s2", "s3"]
  assert rows["corrupt"]["status"] == "failed" and "corrupt.nii.gz" in rows["corrupt"]["error"]
  assert rows["missing"]["status"] == "failed" and "missing.nii.gz" in rows["missing"]["error"]
  fixed_seg = np.asarray(nib.load(str(scans / "s0_seg.nii.gz")).dataobj)
  for name in ("s1", "s2", "s3"):
    assert rows[name]["status"] == "ok", rows[name]
    moved_seg = np.asarray(nib.load(str(out / name / "moved_seg.nii.gz")).dataobj)
    assert float(rows[name]["dice"]) == pytest.approx(_dice(moved_seg, fixed_seg), abs=1e-4)
    assert nib.load(str(out / name / "warp.nii.gz")).shape == (20, 22, 18, 3)
  assert "2 failed (corrupt, missing)" in result.stderr
  assert "pairs/min, ETA" in result.stderr
  # the one-pair command gives the same warp for a pair
  single = subprocess.run(
      [sys.executable, "-m", "experiments.register", f"--workdir={trained / 'run'}",
       f"--moving={good[0]}", f"--fixed={scans / 's0.nii.gz'}", "--affine=none",
       "--instance_steps=2", f"--warp={tmp_path / 'single_warp.nii.gz'}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]
  np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "single_warp.nii.gz")).dataobj),
                             np.asarray(nib.load(str(out / "s1" / "warp.nii.gz")).dataobj),
                             atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_cohort_resumes_without_redoing_a_finished_pair(trained, tmp_path, sig):
  scans = trained / "scans"
  # Ten pairs: the kill lands while most are still to do, however fast a tiny pair registers.
  expected = sorted(f"s{i}" for i in range(1, 11))
  pairs = _pair_list(trained, tmp_path / "pairs.csv",
                     [(str(scans / f"{n}.nii.gz"), None) for n in expected])
  out = tmp_path / "out"
  proc = subprocess.Popen(_command(trained, pairs, out), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and not (
      os.path.exists(out / "results.csv") and len(_rows(out)) >= 1):
    time.sleep(0.05)
  proc.send_signal(sig)
  stderr = proc.communicate(timeout=300)[1]
  first = {r["name"]: r for r in _rows(out)}
  assert 1 <= len(first) < len(expected), stderr[-2000:]
  if sig == signal.SIGTERM:
    assert proc.returncode == 128 + signal.SIGTERM and "run the same command again" in stderr
  stamps = {n: os.path.getmtime(out / n / "warp.nii.gz") for n in first}
  rerun = subprocess.run(_command(trained, pairs, out), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  rows = _rows(out)
  names = [r["name"] for r in rows]
  assert sorted(names) == expected  # each pair once: none redone
  assert all(r["status"] == "ok" for r in rows)
  assert {n: os.path.getmtime(out / n / "warp.nii.gz") for n in first} == stamps
  for name in names:  # every output complete and readable, no temporary file left
    for f in ("moved", "warp", "moved_seg"):
      np.asarray(nib.load(str(out / name / f"{f}.nii.gz")).dataobj)
    assert not [f for f in os.listdir(out / name) if f.startswith(".tmp-")]


@pytest.mark.slow
def test_a_batched_cohort_gives_each_pair_its_result_alone_and_a_bad_pair_fails_alone(
    trained, tmp_path):
  """--batch=3: three pairs per network call and refinement; each pair's warp and Dice are the
  unbatched run's, and a pair that fails inside a batch (a moving scan off the fixed grid with
  --affine=none) fails alone: the batch's other pairs are done."""
  scans = trained / "scans"
  source = nib.load(str(scans / "s4.nii.gz"))
  shifted = source.affine.copy()
  shifted[:3, 3] += 5.0  # the same shape, another grid
  for suffix in ("", "_seg"):
    image = nib.load(str(scans / f"s4{suffix}.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted),
             str(tmp_path / f"offgrid{suffix}.nii.gz"))
  movings = [str(scans / f"s{i}.nii.gz") for i in (1, 2, 3, 5)]
  movings.insert(3, str(tmp_path / "offgrid.nii.gz"))  # the second batch: s5's group
  pairs = _pair_list(trained, tmp_path / "pairs.csv", [(m, None) for m in movings])
  runs = {}
  for batch in (3, 1):
    out = tmp_path / f"batch{batch}"
    result = subprocess.run(_command(trained, pairs, out, f"--batch={batch}",
                                     "--instance_steps=12"),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 3, result.stderr[-3000:]
    runs[batch] = ({r["name"]: r for r in _rows(out)}, result.stderr)
  rows, stderr = runs[3]
  assert "a batch of 2 pairs failed (" in stderr and "one at a time" in stderr
  assert rows["offgrid"]["status"] == "failed" and "one voxel grid" in rows["offgrid"]["error"]
  assert sorted(rows) == sorted(runs[1][0])
  for name in ("s1", "s2", "s3", "s5"):
    assert rows[name]["status"] == runs[1][0][name]["status"] == "ok", rows[name]
    assert float(rows[name]["dice"]) == pytest.approx(float(runs[1][0][name]["dice"]),
                                                      abs=1e-4)
    np.testing.assert_allclose(
        np.asarray(nib.load(str(tmp_path / "batch3" / name / "warp.nii.gz")).dataobj),
        np.asarray(nib.load(str(tmp_path / "batch1" / name / "warp.nii.gz")).dataobj),
        atol=1e-4)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_split_one_list_and_together_equal_one_process(trained, tmp_path):
  """2 processes x 2 simulated devices: every pair done once, the union of their rows equal to a
  one-process run's (one device)."""
  scans = trained / "scans"
  pairs = _pair_list(trained, tmp_path / "pairs.csv",
                     [(str(scans / f"s{i}.nii.gz"), None) for i in range(1, 5)])
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = _free_port()
  procs = [subprocess.Popen(_command(trained, pairs, tmp_path / "two",
                                     f"--coordinator_address=localhost:{port}",
                                     "--num_processes=2", f"--process_id={i}"),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:  # each process: its 2 pairs, one per local device
    err = p.communicate(timeout=900)[1]
    assert p.returncode == 0, err[-3000:]
    assert "pairs split across 2 local devices" in err
  one = subprocess.run(_command(trained, pairs, tmp_path / "one"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  two_rows = {r["name"]: r for r in _rows(tmp_path / "two")}
  one_rows = {r["name"]: r for r in _rows(tmp_path / "one")}
  assert len(_rows(tmp_path / "two")) == 4 and sorted(two_rows) == sorted(one_rows)
  for name, row in one_rows.items():
    assert two_rows[name]["status"] == row["status"] == "ok"
    assert float(two_rows[name]["dice"]) == pytest.approx(float(row["dice"]), abs=1e-5)


def test_a_glob_pairs_every_match_with_the_atlas(tmp_path):
  for s in ("b", "a"):
    (tmp_path / s).mkdir()
    (tmp_path / s / "t1.nii.gz").write_bytes(b"")
  pairs = cohort.pairs_from_glob(str(tmp_path / "*" / "t1.nii.gz"), "atlas.nii.gz", "atlas_seg")
  assert [(p.name, p.fixed, p.fixed_seg) for p in pairs] == [
      ("a_t1", "atlas.nii.gz", "atlas_seg"), ("b_t1", "atlas.nii.gz", "atlas_seg")]
  with pytest.raises(DataError, match="matches no file"):
    cohort.pairs_from_glob(str(tmp_path / "none*.nii"), "atlas.nii.gz")


@pytest.mark.parametrize("args,message", [
    (["--pairs=x.csv"], "--pairs needs --outdir"),
    (["--outdir=o"], "--outdir needs --pairs"),
    (["--pairs=x.csv", "--outdir=o", "--moved=m.nii.gz"], "one-pair flags"),
    (["--pairs=x.csv", "--outdir=o", "--shard=3/3"], "K/N"),
    (["--moving=m.nii.gz", "--fixed=f.nii.gz", "--warp=w.nii.gz", "--batch=2"],
     "--batch: pairs per network call in a cohort"),
])
@pytest.mark.slow
def test_cohort_usage_errors_are_one_clear_message(args, message, tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.register", *args], cwd=tmp_path,
                          env=dict(_env(), PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing written: no outdir, no output file
