"""big_vision-style config arguments: ``configs/default.py:variant=vm1,lam=0.5``.

The string after the colon is a comma-separated list of ``key=value``. A key is a dotted path
into the config (``optimizer.learning_rate=3e-4``) or a short alias (``lam``, ``lr``,
``variant``, ...). Values are Python literals; ``x``-separated integers are tuples
(``shape=64x80x64``); anything else is a string.
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


def parse_value(text: str):
  text = text.strip()
  if re.fullmatch(r"\d+(x\d+)+", text):
    return tuple(int(t) for t in text.split("x"))
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies ``key=value,...`` overrides to ``config`` (in place) and returns it."""
  if not arg:
    return config
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value (in {arg!r})")
    key, value = item.split("=", 1)
    path = ALIASES.get(key.strip(), key.strip()).split(".")
    node = config
    for part in path[:-1]:
      if part not in node:
        raise ValueError(f"config argument {key!r}: no field {'.'.join(path)}")
      node = node[part]
    if path[-1] not in node:
      raise ValueError(f"config argument {key!r}: no field {'.'.join(path)}")
    parsed = parse_value(value)
    if isinstance(node[path[-1]], float) and isinstance(parsed, int):
      parsed = float(parsed)
    if isinstance(node[path[-1]], tuple) and isinstance(parsed, (int, str)):
      parsed = (parsed,)
    try:
      node[path[-1]] = parsed
    except TypeError as e:
      raise ValueError(f"config argument {key}={value}: {e}") from e
  return config
