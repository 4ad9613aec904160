"""Where a command's time goes: named stages, JAX compilation, and the persistent compilation
cache.

``with stages.stage("network"): ...`` times a block when a recorder is active
(:func:`recording`; otherwise it costs nothing) and :func:`sync` waits for a block's arrays so
their computation is charged to it, not to whoever reads them next. JAX's own compile time is
collected from ``jax.monitoring`` events, so a table can say how much of each stage was
compilation and whether the persistent cache supplied the programs.

:func:`enable_compilation_cache` points JAX's persistent compilation cache at
``$VMJAX_CACHE/jax`` (default ``~/.cache/vmjax/jax``, beside the native kernels), so a second
command with the same shapes loads its programs instead of compiling them again.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time

import jax

from vmjax.native import build

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


class Recorder:
  """Seconds per stage (in order of first use), the compile seconds within each, and counts of
  compiled programs and persistent-cache hits."""

  def __init__(self):
    self.seconds = collections.OrderedDict()
    self.compile_seconds = collections.defaultdict(float)
    self.compiled = 0
    self.cache_hits = 0
    self.cache_misses = 0
    self._current = []

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  def table(self, title: str = "stage") -> str:
    """A markdown table: stage, seconds, of which compilation, share of the total."""
    total = sum(self.seconds.values()) or 1.0
    lines = [f"| {title} | s | compile s | % |", "|---|---|---|---|"]
    for name, secs in self.seconds.items():
      lines.append(f"| {name} | {secs:.2f} | {self.compile_seconds.get(name, 0.0):.2f} | "
                   f"{100 * secs / total:.0f} |")
    lines.append(f"| total | {total:.2f} | {sum(self.compile_seconds.values()):.2f} | 100 |")
    return "\n".join(lines)


_recorder: Recorder | None = None
_listeners_installed = False


def _on_duration(event: str, seconds: float, **_) -> None:
  if _recorder is not None and event == _COMPILE_EVENT:
    _recorder.compiled += 1
    where = _recorder._current[-1] if _recorder._current else "(outside stages)"
    _recorder.compile_seconds[where] += seconds


def _on_event(event: str, **_) -> None:
  if _recorder is None:
    return
  if event == _CACHE_HIT_EVENT:
    _recorder.cache_hits += 1
  elif event == _CACHE_MISS_EVENT:
    _recorder.cache_misses += 1


def _install_listeners() -> None:
  global _listeners_installed
  if not _listeners_installed:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
    _listeners_installed = True


@contextlib.contextmanager
def recording():
  """Makes a fresh :class:`Recorder` active for the block and yields it."""
  global _recorder
  _install_listeners()
  previous, _recorder = _recorder, Recorder()
  try:
    yield _recorder
  finally:
    _recorder = previous


@contextlib.contextmanager
def stage(name: str):
  """Charges the block's wall time to ``name`` while a recorder is active (nested stages are
  charged to themselves, not to the enclosing one)."""
  rec = _recorder
  if rec is None:
    yield
    return
  start = time.perf_counter()
  rec._current.append(name)
  inner = sum(rec.seconds.values())
  try:
    yield
  finally:
    rec._current.pop()
    nested = sum(rec.seconds.values()) - inner
    rec.add(name, time.perf_counter() - start - nested)


def sync(tree):
  """``jax.block_until_ready(tree)`` while recording (so a stage's time is its own); the tree
  unchanged (and no wait) otherwise."""
  if _recorder is not None:
    jax.block_until_ready(tree)
  return tree


def cache_dir() -> str:
  return os.path.join(build.cache_root(), "jax")


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache in ``path`` (default :func:`cache_dir`) for
  every program, however quick to compile; returns the folder. ``VMJAX_COMPILATION_CACHE=0``
  leaves it off."""
  if os.environ.get("VMJAX_COMPILATION_CACHE", "1") == "0":
    return ""
  path = path or cache_dir()
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
