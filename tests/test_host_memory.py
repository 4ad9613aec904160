"""vmjax.host_memory: freed large blocks are reused, not mapped and faulted in afresh."""

import ctypes
import resource
import sys

import pytest

from vmjax import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc settings: Linux only")

_SIZE = 96 << 20  # above glibc's largest default mmap threshold (32 MB)


def _faults_of_a_fresh_block(libc) -> int:
  """Minor page faults this thread takes allocating a large block, writing all of it, freeing
  it."""
  before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
  block = libc.malloc(_SIZE)
  assert block
  ctypes.memset(block, 1, _SIZE)
  libc.free(block)
  return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_freed_large_block_is_reused_without_page_faults():
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
  libc.free.argtypes = (ctypes.c_void_p,)
  pages = _SIZE // resource.getpagesize()
  if not host_memory.keep_freed_memory():
    pytest.skip("this C library refused the settings (not glibc?)")
  _faults_of_a_fresh_block(libc)  # the heap grows once
  # Each reuse faults in (nearly) nothing; a fresh mmap would fault in every page (or every
  # huge page: still > 1 % of them).
  assert _faults_of_a_fresh_block(libc) < pages // 100


_IN_A_THREAD = """
import ctypes, sys, threading
sys.path.insert(0, {tests!r})
from vmjax import host_memory
import test_host_memory as t
assert host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
thread = threading.Thread(target=lambda: faults.extend(t._faults_of_a_fresh_block(libc)
                                                       for _ in range(2)))
thread.start()
thread.join()
print(faults[1])
"""


def test_a_thread_started_afterwards_reuses_freed_blocks_too():
  """A thread started after the settings (as XLA's are, in a command) allocates from the same
  heap: its own arena could not keep a block above 64 MB and would map it afresh each time.
  In a fresh interpreter: the settings apply to threads that have no arena yet."""
  import os
  import subprocess
  code = _IN_A_THREAD.format(tests=os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert int(out.stdout.split()[-1]) < (_SIZE // resource.getpagesize()) // 100, out.stdout
