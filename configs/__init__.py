"""Training configurations (``get_config(arg)`` files, big_vision style: ``--config=FILE:ARG``).

They ship inside the package as ``vmjax.configs`` (pyproject's package-dir), so an installed
``vmjax-train --config=configs/demo.py`` finds them without a checkout: a ``--config`` path that
is not a file here resolves to the shipped config of that name (:func:`resolve`). Configs import
one another as ``from vmjax.configs import default``.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def shipped() -> list[str]:
  """Names of the shipped configs (``demo``, ``default``, ...)."""
  return sorted(n[:-3] for n in os.listdir(DIR) if n.endswith(".py") and n != "__init__.py")


def resolve(path: str) -> str:
  """``path`` when it is a file; else, when it names a shipped config as README does
  (``configs/demo.py``, ``demo.py`` or ``demo``), that config's file; else ``path`` unchanged
  (the flag then says it is missing: a mistyped path to a config of one's own, such as
  ``myconfigs/demo.py``, is never swapped for a shipped one)."""
  if os.path.isfile(path) or os.path.dirname(path) not in ("", "configs"):
    return path
  name = os.path.basename(path)
  candidate = os.path.join(DIR, name if name.endswith(".py") else name + ".py")
  return candidate if os.path.isfile(candidate) else path


def resolve_argv(argv: list[str], flag: str = "config") -> list[str]:
  """``argv`` with the path of ``--config=PATH[:ARG]`` (or ``--config PATH[:ARG]``) resolved by
  :func:`resolve`; the ``:ARG`` and every other argument unchanged."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(f"--{flag}="):
      value = arg[len(f"--{flag}="):]
      path, sep, rest = value.partition(":")
      out.append(f"--{flag}={resolve(path)}{sep}{rest}")
    elif arg == f"--{flag}" and i + 1 < len(argv):
      path, sep, rest = argv[i + 1].partition(":")
      out += [arg, f"{resolve(path)}{sep}{rest}"]
      i += 1
    else:
      out.append(arg)
    i += 1
  return out
