"""Metric summaries: ``workdir/metrics.jsonl`` and TensorBoard events (tensorboardX)."""

from __future__ import annotations

import json
import os
import time

from absl import logging

from vmjax.atomic import atomic_path


class MetricWriter:
  """Writes scalar metrics; a no-op where ``enabled`` is False (every process but the first)."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    """``resume_step``: the step training resumes from; rows after it (written by the run that
    was interrupted after its last checkpoint) are dropped, so the file reads as one run."""
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    _truncate_after(path, resume_step)
    self._jsonl = open(path, "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.warning("tensorboardX not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Keeps only the rows of ``path`` up to ``step`` (atomically; nothing to do if none later)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) == len(lines):
    return
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.writelines(kept)
