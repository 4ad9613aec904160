"""The on-disk alignment cache: an entry gives back exactly the matrix stored; its key changes
with anything the alignment depends on; a damaged entry, a cache turned off or one that cannot be
written cost a computation, never a wrong matrix or a failed registration; a known fixed scan is
aligned once across commands."""

import os

import numpy as np
import pytest

from vmjax import affine
from vmjax import caches
from vmjax import io
from vmjax import pipeline
from vmjax import pretrained


def scan(seed, path="scan", shape=(6, 7, 8), affine_matrix=None):
  image = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
  return io.Volume(image=image, seg=None, path=path,
                   affine=np.eye(4) if affine_matrix is None else affine_matrix)


def matrix(seed):
  world = np.eye(4)
  world[:3] = np.random.default_rng(seed).normal(size=(3, 4))
  return world


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """The alignment cache on (conftest turns it off for every other test), in a folder of the
  test's own."""
  monkeypatch.setenv("VMJAX_ALIGNMENT_CACHE", "1")
  monkeypatch.setattr(caches, "folder", lambda kind: str(tmp_path / kind))
  return tmp_path / "alignments"


def test_an_entry_gives_back_exactly_the_matrix_stored(cache):
  volume, template = scan(0), scan(1, "template")
  entry = caches.alignment_entry(volume, template)
  assert caches.read_alignment(entry) is None
  world = matrix(2)
  caches.write_alignment(entry, world, volume)
  assert os.listdir(cache) == [os.path.basename(entry)]
  back = caches.read_alignment(entry)
  assert back.dtype == np.float64 and np.array_equal(back, world)  # bit for bit


def test_the_key_follows_the_scan_the_template_and_the_code(cache, monkeypatch):
  volume, template = scan(0), scan(1, "template")
  key = caches.alignment_entry(volume, template)
  copy = io.Volume(image=volume.image.copy(), seg=None, affine=volume.affine.copy(), path="x")
  assert caches.alignment_entry(copy, template) == key  # the same data under another name
  one_voxel = volume.image.copy()
  one_voxel[3, 2, 1] += 1e-3
  shifted = volume.affine.copy()
  shifted[0, 3] += 1e-6
  others = [io.Volume(image=one_voxel, seg=None, affine=volume.affine, path="scan"),
            io.Volume(image=volume.image, seg=None, affine=shifted, path="scan")]
  keys = {caches.alignment_entry(v, template) for v in others}
  keys.add(caches.alignment_entry(volume, scan(3, "template")))
  keys.add(caches.alignment_entry(template, volume))  # the roles swapped
  monkeypatch.setattr(caches, "code_digest", lambda: "other code")
  keys.add(caches.alignment_entry(volume, template))
  assert key not in keys and len(keys) == 5


@pytest.mark.parametrize("text", ["{", '{"world": [[1, 2], [3, 4]]}', '{"other": 1}',
                                  '{"world": [[NaN, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], '
                                  '[0, 0, 0, 1]]}'])
def test_a_damaged_entry_is_not_used(cache, text):
  volume, template = scan(0), scan(1, "template")
  entry = caches.alignment_entry(volume, template)
  os.makedirs(cache)
  with open(entry, "w") as f:
    f.write(text)
  assert caches.read_alignment(entry) is None


def test_off_or_unwritable_costs_nothing_but_the_computation(cache, monkeypatch, tmp_path):
  volume, template = scan(0), scan(1, "template")
  monkeypatch.setenv("VMJAX_ALIGNMENT_CACHE", "0")
  entry = caches.alignment_entry(volume, template)
  assert entry is None and caches.read_alignment(entry) is None
  caches.write_alignment(entry, matrix(2), volume)
  assert not cache.exists()
  monkeypatch.setenv("VMJAX_ALIGNMENT_CACHE", "1")
  (tmp_path / "a file").write_text("")
  monkeypatch.setattr(caches, "folder", lambda kind: str(tmp_path / "a file" / kind))
  entry = caches.alignment_entry(volume, template)
  caches.write_alignment(entry, matrix(2), volume)  # a warning, no exception
  assert caches.read_alignment(entry) is None


def test_a_known_fixed_scan_is_aligned_once_across_commands(cache, monkeypatch):
  # Counted calls of the affine registration, each scan's matrix a function of its voxels:
  # the second command (a fresh call, as a new process would make it) computes the moving
  # scan's alignment alone and gets the fixed scan's matrix it computed the first time.
  calls = []

  def register(volume, template):
    calls.append(volume.path)
    return matrix(int(volume.image.sum() * 1000) % 1000)

  monkeypatch.setattr(affine, "affine_register", register)
  template = scan(9, "template", (16, 16, 16))
  space = pretrained.ModelSpace(shape=(16, 16, 16), affine=np.eye(4), template=template)
  fixed, moving, other = scan(0, "fixed"), scan(1, "moving"), scan(2, "other")
  first = pipeline._affine_steps(moving, fixed, space, None)
  assert sorted(calls) == ["fixed", "moving"]
  calls.clear()
  second = pipeline._affine_steps(other, fixed, space, None)
  assert calls == ["other"]
  assert np.array_equal(second[1], first[1])
  calls.clear()
  assert np.array_equal(pipeline.align_to_space(fixed, space).world, first[1]) and not calls
  # Moving scans' alignments are not remembered; an atlas aligned by align_to_space is.
  assert np.array_equal(pipeline.align_to_space(other, space).world, second[0])
  assert calls == ["other"]
  pipeline.align_to_space(other, space)
  assert calls == ["other"]
