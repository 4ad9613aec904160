"""Building and loading vmjax's native CPU kernels (the C++ sources beside this file).

Why they exist (measured: docs/performance.md): XLA:CPU runs 3x3x3 convolutions ~10x
slower than oneDNN (``onednn_conv.cc``, dispatched by :mod:`vmjax.conv`), and trilinear warps,
their gradients and NCC's box sums 2-2.5x slower than one OpenMP loop (``resample.cc``,
dispatched by :mod:`vmjax.kernels`). Both are compiled with the system C++ compiler (``$CXX``,
default ``g++``) the first time a computation is traced for the CPU backend and cached under
``$VMJAX_CACHE/native`` (default ``~/.cache/vmjax/native``), one library per source text, jax
version, oneDNN version, compiler and flags (and this CPU's instruction set when the flags tune
for it), so a cache shared by several machines never hands one another's build. A build that
cannot happen (no compiler, no oneDNN, not x86-64 Linux) raises :class:`OSError`; the callers
then log one warning and run XLA's computation. ``VMJAX_CONV=xla`` / ``VMJAX_KERNELS=xla``
switch the two off; ``vmjax-build-native`` builds them ahead of time (container images).
:func:`dispatch` puts a native path and its XLA reference into a traced computation.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import sysconfig

import jax
import jax.extend.backend
from jax import lax

from vmjax.atomic import atomic_path

HERE = os.path.dirname(os.path.abspath(__file__))
CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")


def _dnnl_prefixes() -> list[str]:
  """Where the oneDNN wheels may have put ``include/`` and ``lib/``."""
  prefixes = [os.environ.get("VMJAX_DNNL_ROOT", ""), sys.prefix, sys.base_prefix,
              sysconfig.get_config_var("userbase") or "", "/usr", "/usr/local"]
  try:
    import site  # pylint: disable=g-import-not-at-top
    prefixes.append(site.getuserbase())
  except AttributeError:
    pass
  return [p for p in dict.fromkeys(prefixes) if p]


def find_dnnl() -> tuple[str, str]:
  """oneDNN's ``(include, libdir)`` (the ``onednn-*`` wheels of requirements.txt)."""
  for prefix in _dnnl_prefixes():
    include = os.path.join(prefix, "include")
    for libdir in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64"),
                   os.path.join(prefix, "lib", "x86_64-linux-gnu")):
      if (os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"))
          and os.path.exists(os.path.join(libdir, "libdnnl.so"))):
        return include, libdir
  raise FileNotFoundError(
      "oneDNN headers/library not found (pip install onednn-cpu-gomp onednn-devel-cpu-gomp; "
      f"searched {_dnnl_prefixes()}; or set VMJAX_DNNL_ROOT)")


def dnnl_version(include: str) -> str:
  """``MAJOR.MINOR.PATCH`` from oneDNN's ``dnnl_version.h`` (``"unknown"`` without one)."""
  try:
    with open(os.path.join(include, "oneapi", "dnnl", "dnnl_version.h")) as f:
      text = f.read()
  except OSError:
    return "unknown"
  parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text)
           for p in ("MAJOR", "MINOR", "PATCH")]
  return ".".join(m.group(1) if m else "?" for m in parts)


def compiler_version(cxx: str) -> str:
  """The first line of ``cxx --version`` (``"unknown"`` when it does not run)."""
  try:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
  except (OSError, subprocess.CalledProcessError, IndexError):
    return "unknown"


def _cpuinfo(key: str) -> str | None:
  """The first ``key : value`` of ``/proc/cpuinfo`` (None where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.split(":", 1)[0].strip() == key:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_flags() -> str:
  """This CPU's instruction-set flags (``/proc/cpuinfo``), ``""`` where unknown."""
  return _cpuinfo("flags") or ""


def cpu_model() -> str:
  """The CPU's model name, for logs and benchmark headers (these machines differ)."""
  return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def bf16_isa() -> str | None:
  """The CPU's bf16 instructions that oneDNN uses: ``"AMX"``, ``"AVX512-BF16"`` or None."""
  flags = cpu_flags().split()
  if "amx_bf16" in flags:
    return "AMX"
  if "avx512_bf16" in flags:
    return "AVX512-BF16"
  return None


def cache_key(source_text: bytes, *, compiler: str, flags: tuple[str, ...],
              onednn: tuple[str, str] | None, cpu: str) -> str:
  """The library's cache key: a hash of everything its binary depends on. ``onednn``:
  ``(libdir, version)`` when it links oneDNN; ``cpu``: the CPU's flags, which count only when
  ``flags`` tune for this CPU (``-march=native``)."""
  parts = [source_text, jax.__version__.encode(), compiler.encode(),
           " ".join(CXXFLAGS + tuple(flags)).encode(),
           "|".join(onednn).encode() if onednn else b"",
           cpu.encode() if "-march=native" in flags else b""]
  return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def cache_root() -> str:
  """The root of vmjax's caches: ``$VMJAX_CACHE``, default ``~/.cache/vmjax`` (the native
  kernels in ``native/``, JAX's compiled programs in ``jax/``: :func:`vmjax.stages.cache_dir`)."""
  return os.environ.get("VMJAX_CACHE", os.path.expanduser("~/.cache/vmjax"))


def build_library(source: str, link_onednn: bool = True, extra_flags: tuple = ()) -> str:
  """Compiles ``source`` once per :func:`cache_key` and returns the shared library's path
  (under ``$VMJAX_CACHE/native``). ``link_onednn=False``: a kernel that needs only XLA's FFI
  headers and OpenMP. Several processes may build at once: one builds (a file lock), the
  library appears by rename (never half-written)."""
  if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
    raise OSError(f"vmjax's native kernels are built for x86-64 Linux only, not "
                  f"{platform.machine()}")
  include, libdir = find_dnnl() if link_onednn else ("", "")
  with open(source, "rb") as f:
    text = f.read()
  cxx = os.environ.get("CXX", "g++")
  key = cache_key(text, compiler=compiler_version(cxx), flags=tuple(extra_flags),
                  onednn=(libdir, dnnl_version(include)) if link_onednn else None,
                  cpu=cpu_flags())
  cache = os.path.join(cache_root(), "native")
  os.makedirs(cache, exist_ok=True)
  stem = os.path.splitext(os.path.basename(source))[0]
  library = os.path.join(cache, f"libvmjax_{stem}_{key}.so")
  if os.path.exists(library):
    return library
  with open(os.path.join(cache, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (several processes per host)
    if os.path.exists(library):
      return library
    with atomic_path(library) as tmp:  # a half-written library is never picked up
      cmd = [cxx, *CXXFLAGS, *extra_flags, source, "-o", tmp, f"-I{jax.ffi.include_dir()}"]
      if link_onednn:
        cmd += [f"-I{include}", f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}"]
      try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
      except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise OSError(f"building the native kernel {stem} failed ({' '.join(cmd)}): "
                      f"{detail[-2000:]}") from e
  return library


def load(source: str, targets: dict[str, str], **build_kwargs) -> str:
  """Builds ``source`` (:func:`build_library`), registers each ``{ffi_target: symbol}`` of it
  for the CPU, and returns the library's path. Raises on any failure (the callers fall back)."""
  path = build_library(source, **build_kwargs)
  lib = ctypes.cdll.LoadLibrary(path)
  for target, symbol in targets.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return path


@functools.cache
def cpu_only() -> bool:
  """Whether the CPU is this process's only platform: then no program of it is lowered for
  another one, and a native CPU path need not be traced beside its XLA reference."""
  return set(jax.extend.backend.backends()) == {"cpu"}


def dispatch(native, reference, *args):
  """``native(*args)`` for the CPU and ``reference(*args)`` for any other platform, in a traced
  computation: in a CPU-only process the native call alone; elsewhere both, chosen at lowering
  (``lax.platform_dependent``, which leaves a conditional around the chosen call in the
  program: XLA:CPU copies its operands in and out). The default ``vmjax-register`` without the
  conditionals: 10.9 / 11.4 s against 12.4 / 12.7 s (affine step, network and refinement each
  faster; 2-core AMD EPYC Zen 4, 2026-12-06)."""
  if cpu_only():
    return native(*args)
  return lax.platform_dependent(*args, cpu=native, default=reference)
