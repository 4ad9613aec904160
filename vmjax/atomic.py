"""Write-then-rename: an output file appears complete or not at all.

Every file vmjax writes (volumes, figures, tables, the native kernel) goes through
:func:`atomic_path`: the writer fills a uniquely named temporary file in the destination's
directory (so two processes writing the same output never share it), which replaces the
destination with ``os.replace`` only when writing succeeded. A crash or an exception leaves the
previous file (or none) in place and removes the temporary one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def _default_mode() -> int:
  """The mode a plain ``open()`` would give a new file (``mkstemp`` gives 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def _extension(name: str) -> str:
  """``.nii.gz`` of ``scan.nii.gz``: writers that infer the format from the name still can."""
  stem, dot, rest = name.lstrip(".").partition(".")
  del stem
  return dot + rest


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path to write; on success it is renamed to ``path``.

  The temporary file has ``path``'s extension (``.nii.gz``, ``.npz``, ``.png``, ...) and lives in
  its directory, which is created if missing.
  """
  path = os.path.abspath(str(path))
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_extension(os.path.basename(path)),
                             dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
