"""big_vision-style config arguments: ``configs/default.py:variant=vm1,lam=0.5``.

The string after the colon is a comma-separated list of ``key=value``. A key is a dotted path
into the config (``optimizer.learning_rate=3e-4``) or a short alias (``lam``, ``lr``,
``variant``, ...). A comma starts a new item only where ``key=`` follows it, so values may hold
commas: ``data.train=a.nii.gz,b.nii.gz``, ``data.seg_replace=(t1,seg)``, ``shape=[64,80,64]``.

Each value is read as the type the config field already has: tuples from ``(a,b)``, ``[a,b]``,
``a,b`` or ``64x80x64``; integers also from integral scientific notation (``steps=1e4``);
floats from any number; booleans from ``True``/``False`` (any case) or ``1``/``0``; strings as
given. An unknown key or a value that does not fit the field is one ``ValueError`` naming the key.
"""

from __future__ import annotations

import ast
import re

import ml_collections

ALIASES = {
    "variant": "model.variant",
    "int_steps": "model.int_steps",
    "lam": "loss.lam",
    "image": "loss.image",
    "window": "loss.window",
    "bidir": "loss.bidir",
    "seg_weight": "loss.seg_weight",
    "lr": "optimizer.learning_rate",
    "steps": "num_steps",
    "batch": "per_device_batch_size",
    "shape": "data.shape",
    "downsample": "data.downsample",
    "mode": "data.mode",
}

_KEY = re.compile(r"\s*[A-Za-z_][\w.]*\s*=")
_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def split_list(text: str, before_key: bool = False) -> list[str]:
  """Splits ``text`` at commas outside brackets and quotes (with ``before_key``, only at those
  followed by ``key=``): ``a,b,(c,d)`` to ``["a", "b", "(c,d)"]``."""
  parts, current, depth, quote = [], [], 0, None
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in _BRACKETS:
      depth += 1
    elif ch in _BRACKETS.values():
      depth = max(depth - 1, 0)
    elif ch == "," and depth == 0 and (not before_key or _KEY.match(text, i + 1)):
      parts.append("".join(current))
      current = []
      continue
    current.append(ch)
  parts.append("".join(current))
  return [p.strip() for p in parts if p.strip()]


def _literal(text: str):
  """A Python literal if ``text`` is one, else the text itself (an unquoted string)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(text: str, like=None):
  """``text`` as the type of ``like`` (the field's current value); untyped: a literal, an
  ``x``-separated integer tuple, or the string."""
  text = text.strip()
  if isinstance(like, tuple):
    if re.fullmatch(r"\d+(x\d+)+", text):
      return tuple(int(t) for t in text.split("x"))
    if text[:1] in "([" and text[-1:] in ")]":
      text = text[1:-1]
    return tuple(parse_value(t, like[0] if like else None) for t in split_list(text))
  if isinstance(like, str):
    value = _literal(text)
    return value if isinstance(value, str) else text
  if isinstance(like, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise TypeError(f"expects a boolean (True/False), got {text!r}")
  if isinstance(like, int):
    value = _literal(text)
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise TypeError(f"expects an integer, got {text!r}")
  if isinstance(like, float):
    value = _literal(text)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise TypeError(f"expects a number, got {text!r}")
  if re.fullmatch(r"\d+(x\d+)+", text):
    return tuple(int(t) for t in text.split("x"))
  return _literal(text)


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies ``key=value,...`` overrides to ``config`` (in place) and returns it."""
  if not arg:
    return config
  for item in split_list(arg, before_key=True):
    if "=" not in item:
      raise ValueError(f"config argument {item.strip()!r} is not key=value (in {arg!r})")
    key, value = (t.strip() for t in item.split("=", 1))
    path = ALIASES.get(key, key).split(".")
    node = config
    for depth, part in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f"config argument {key!r}: the config has no field "
                         f"{'.'.join(path[:depth + 1])}")
      if depth < len(path) - 1:
        node = node[part]
    field = ".".join(path)
    try:
      node[path[-1]] = parse_value(value, node[path[-1]])
    except (TypeError, ValueError) as e:
      raise ValueError(f"config argument {key}={value}: {field} {e}") from e
  return config
