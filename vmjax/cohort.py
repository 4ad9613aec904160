"""Registering a whole study: many pairs in one command, split over processes, resumable, one
row per pair in ``results.csv``.

A pair list is a CSV with a header and the columns ``moving,fixed`` (optionally
``moving_seg,fixed_seg,name``), or a glob of moving scans and one fixed scan (every subject to
an atlas). Each pair writes its files into ``OUTDIR/<name>/`` (atomically) and then appends its
row to ``OUTDIR/results.csv`` under a file lock, so a row exists only for a pair whose files are
all there. A rerun of the same command skips the pairs whose last row is ``ok`` and whose files
exist, and retries the others. With several processes each takes the pairs ``i`` with
``i % num_shards == shard``: every pair is done by exactly one of them.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import glob
import io as _io
import os
import re

from vmjax.checks import DataError
from vmjax.io import IMAGE_SUFFIXES

RESULT_COLUMNS = ("name", "status", "error", "seconds", "dice", "folding_percent", "moving",
                  "fixed")


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  moving: str
  fixed: str
  moving_seg: str | None = None
  fixed_seg: str | None = None


def scan_stem(path: str) -> str:
  """A scan file's name without its folder and suffix (``.nii.gz`` counts as one suffix)."""
  base = os.path.basename(path)
  for suffix in IMAGE_SUFFIXES:
    if base.lower().endswith(suffix):
      return base[:-len(suffix)]
  return os.path.splitext(base)[0]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "pair"


def unique_names(paths: list[str]) -> list[str]:
  """A folder name per moving scan: its stem; where stems repeat (``sub-*/t1.nii.gz``), the
  parent folder's name and the stem; where those still repeat, numbered ``_2``, ``_3``..."""
  stems = [_safe(scan_stem(p)) for p in paths]
  names = [s if stems.count(s) == 1 else
           _safe(f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}")
           for p, s in zip(paths, stems)]
  seen: dict[str, int] = {}
  out = []
  for n in names:
    seen[n] = seen.get(n, 0) + 1
    out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
  return out


def read_pair_list(path: str) -> list[Pair]:
  """Pairs from a CSV (header: ``moving,fixed[,moving_seg,fixed_seg,name]``); relative paths
  are relative to the CSV's folder. Bad lists are a :class:`DataError` naming the file."""
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      header = reader.fieldnames or []
  except OSError as e:
    raise DataError(f"--pairs={path}: cannot read the pair list: {e.strerror or e}") from e
  if not rows:
    raise DataError(f"--pairs={path}: no pairs (a CSV with a header line 'moving,fixed' and one "
                    "row per pair)")
  missing = [c for c in ("moving", "fixed") if c not in header]
  if missing:
    raise DataError(f"--pairs={path}: the header has no column {', '.join(missing)} (found "
                    f"{', '.join(header)}); columns: moving,fixed[,moving_seg,fixed_seg,name]")
  base = os.path.dirname(os.path.abspath(path))
  resolve = lambda p: (os.path.join(base, p.strip()) if p and p.strip() else None)
  for i, row in enumerate(rows, start=2):
    if not (row.get("moving") or "").strip() or not (row.get("fixed") or "").strip():
      raise DataError(f"--pairs={path}: line {i} has no moving or no fixed scan")
  given = [(row.get("name") or "").strip() for row in rows]
  defaults = unique_names([resolve(r["moving"]) for r in rows])
  names = [_safe(g) if g else d for g, d in zip(given, defaults)]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise DataError(f"--pairs={path}: names must be unique, repeated: {', '.join(duplicated)}")
  return [Pair(name, resolve(r["moving"]), resolve(r["fixed"]), resolve(r.get("moving_seg")),
               resolve(r.get("fixed_seg"))) for name, r in zip(names, rows)]


def pairs_from_glob(moving_glob: str, fixed: str, fixed_seg: str | None = None) -> list[Pair]:
  """Every scan matching ``moving_glob`` (sorted) to one ``fixed`` scan (an atlas)."""
  movings = sorted(glob.glob(moving_glob))
  if not movings:
    raise DataError(f"--moving={moving_glob}: matches no file")
  return [Pair(name, m, fixed, None, fixed_seg)
          for name, m in zip(unique_names(movings), movings)]


def shard(pairs: list[Pair], index: int, count: int) -> list[Pair]:
  """The pairs of shard ``index`` of ``count`` (round robin: similar work per shard)."""
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"shard {index} of {count}: need 0 <= index < count")
  return pairs[index::count]


def parse_shard(spec: str) -> tuple[int, int]:
  """``"K/N"`` (K in 0..N-1) to ``(K, N)``."""
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
  if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
    raise ValueError(f"--shard={spec!r}: expected K/N with 0 <= K < N, e.g. 0/4")
  return int(match.group(1)), int(match.group(2))


def pair_outputs(outdir: str, pair: Pair, extra: tuple[str, ...] = ()) -> dict[str, str]:
  """The files a pair writes: ``moved``, ``warp`` (+ ``moved_seg`` with labels), ``extra``
  (``warp_ants``, ``warp_ants_inverse``), all ``.nii.gz`` in ``outdir/<name>/``."""
  names = ["moved", "warp"] + (["moved_seg"] if pair.moving_seg else []) + list(extra)
  return {n: os.path.join(outdir, pair.name, f"{n}.nii.gz") for n in names}


def remove_stale_temporaries(outdir: str, pair: Pair) -> None:
  """Deletes what a killed run left in the pair's folder: the hidden temporary files of
  :func:`vmjax.atomic.atomic_path` (complete outputs are never among them). A pair belongs to
  one process, so no other writer is at work there."""
  folder = os.path.join(outdir, pair.name)
  for path in glob.glob(os.path.join(folder, ".tmp-*")):
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


def results_path(outdir: str) -> str:
  return os.path.join(outdir, "results.csv")


def read_results(outdir: str) -> dict[str, dict]:
  """The last row of each pair in ``outdir/results.csv`` (a retried pair has several)."""
  path = results_path(outdir)
  if not os.path.exists(path):
    return {}
  with open(path, newline="") as f:
    return {row["name"]: row for row in csv.DictReader(f)}


def is_done(outdir: str, pair: Pair, rows: dict, extra: tuple[str, ...] = ()) -> bool:
  """A pair is done when its last row says ``ok`` and every file it writes exists."""
  row = rows.get(pair.name)
  return bool(row and row["status"] == "ok" and
              all(os.path.exists(p) for p in pair_outputs(outdir, pair, extra).values()))


def append_result(outdir: str, row: dict) -> None:
  """Appends one row to ``results.csv`` (the header first if the file is new), under an
  exclusive lock and in one write: processes sharing ``outdir`` never interleave lines."""
  path = results_path(outdir)
  buffer = _io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
  writer.writerow({c: row.get(c, "") for c in RESULT_COLUMNS})
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
      if new:
        f.write(",".join(RESULT_COLUMNS) + "\r\n")
      f.write(buffer.getvalue())
      f.flush()
      os.fsync(f.fileno())
