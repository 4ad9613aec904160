"""What vmjax computes once and reuses across commands, under one folder: ``$VMJAX_CACHE``
(default ``~/.cache/vmjax``), a subfolder per kind: ``native/`` (the compiled kernels,
:mod:`vmjax.native.build`), ``jax/`` (XLA's compiled programs, :mod:`vmjax.stages`) and
``alignments/`` (a fixed scan's affine alignment to a model's template, :func:`alignment_entry`).
Deleting the folder is always safe: everything in it is computed again when needed.

The alignment of a fixed scan (an atlas, a baseline scan) that many moving scans meet is the
same in every command that registers to it; remembering it halves the affine step of every
command after the first (2-core AMD EPYC Zen 4, 2026-12-06: both scans side by side 1.2-1.6 s,
the moving scan's alone 0.7 s). An entry is keyed by everything the result depends on: the
scan's voxels (dtype, shape, memory order) and voxel-to-world matrix, the template's, and
vmjax's own code (every source file of the package, so any change of method, default or kernel
starts afresh), with jax's version; it holds the 4x4 matrix as JSON. ``VMJAX_ALIGNMENT_CACHE=0``
turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from absl import logging
import jax
import numpy as np

from vmjax.atomic import atomic_path

_PACKAGE = pathlib.Path(__file__).resolve().parent


def folder(kind: str) -> str:
  """``$VMJAX_CACHE/<kind>`` (default ``~/.cache/vmjax/<kind>``); not created here."""
  return os.path.join(os.environ.get("VMJAX_CACHE", os.path.expanduser("~/.cache/vmjax")), kind)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
  """A digest of vmjax's source (every ``.py`` and ``.cc`` file of the package) and jax's
  version: what a cached result was computed by."""
  h = hashlib.sha256(jax.__version__.encode())
  for path in sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".cc")):
    h.update(str(path.relative_to(_PACKAGE)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()


def _add_array(h, array: np.ndarray) -> None:
  """Feeds an array's dtype, shape, memory order and bytes to ``h`` (without copying a C- or
  Fortran-ordered array: 20 ms for a 256x256x160 scan)."""
  array = np.asarray(array)
  if array.flags.c_contiguous:
    order, view = "C", array
  elif array.flags.f_contiguous:
    order, view = "F", array.T
  else:
    order, view = "C", np.ascontiguousarray(array)
  h.update(f"{array.dtype.str}{array.shape}{order}".encode())
  h.update(memoryview(view).cast("B"))


def alignment_entry(volume, template) -> str | None:
  """The cache file of ``volume``'s alignment to ``template`` (both :class:`vmjax.io.Volume`),
  present or not; None when ``VMJAX_ALIGNMENT_CACHE=0``."""
  if os.environ.get("VMJAX_ALIGNMENT_CACHE", "1") == "0":
    return None
  h = hashlib.sha256(b"template alignment\0" + code_digest().encode())
  for scan in (volume, template):
    _add_array(h, scan.image)
    _add_array(h, np.asarray(scan.affine, np.float64))
  return os.path.join(folder("alignments"), h.hexdigest() + ".json")


def read_alignment(entry: str | None) -> np.ndarray | None:
  """The 4x4 matrix stored at ``entry``; None if there is none or it cannot be read (damaged,
  half a matrix: it is then computed again and replaced)."""
  if entry is None:
    return None
  try:
    with open(entry) as f:
      world = np.asarray(json.load(f)["world"], np.float64)
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return world if world.shape == (4, 4) and np.all(np.isfinite(world)) else None


def write_alignment(entry: str | None, world: np.ndarray, volume) -> None:
  """Stores ``world`` at ``entry`` (atomically); a cache that cannot be written (a read-only
  home) costs a warning, never the registration."""
  if entry is None:
    return
  try:
    with atomic_path(entry) as tmp, open(tmp, "w") as f:
      json.dump({"world": np.asarray(world, np.float64).tolist(),
                 "scan": os.path.abspath(volume.path)}, f)
  except OSError as e:
    logging.warning("could not remember the alignment of %s in %s (%s); it is computed again "
                    "next time", volume.path, os.path.dirname(entry), e)
