"""Large host buffers kept for reuse instead of mapped afresh at every use (Linux, glibc).

glibc's ``malloc`` serves every request above its mmap threshold (which grows to at most 32 MB)
with a fresh ``mmap`` and returns it to the system when freed. XLA:CPU allocates each
intermediate of a program at every execution, so a refinement step's 59 MB maps (a 160x192x160
displacement, NCC's box sums) had their pages faulted in and zeroed by the kernel anew at every
step: ``2 * d`` of a 160x192x160x3 field took 17.9 ms instead of 4.2 ms, the x2 upsampling of a
field 23.7 instead of 8.4 (2-core AMD EPYC Zen 4, 2026-12-06). :func:`keep_freed_memory` raises
the threshold and the trim threshold so that freed blocks stay in the heap for the next
allocation, and keeps every thread on that one heap: a thread's own arena holds at most 64 MB
blocks, so whatever XLA's threads allocated beyond (the network's activations, a program's
temporaries) was mapped afresh at every use whatever the threshold. ``vmjax-register`` took
540k minor page faults and 2.0 s of system time with the threshold alone, 226k and 1.0 s with
one heap (wall 9.6 -> 8.4-8.9 s, same machine, alternated). The commands call it at start
(:func:`vmjax.cli.run_main`), before XLA starts its threads; a process's resident memory then
stays at its peak.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
_THRESHOLD = 1 << 30  # mmap only for single blocks above 1 GiB
_TRIM = 1 << 31  # return the heap's top to the system only past 2 GiB free


@functools.cache
def keep_freed_memory() -> bool:
  """Makes glibc keep freed large blocks for reuse; True if it took effect (False elsewhere:
  not Linux, not glibc, or the settings refused)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return (bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
          and bool(mallopt(_M_ARENA_MAX, 1)))
