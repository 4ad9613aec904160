"""Pretrained models that ship inside the package: parameters, config and template, no download.

Each model ``NAME`` is three files in ``vmjax/weights/``: ``NAME.msgpack`` (the network's
parameters, flax msgpack), ``NAME.json`` (its training config and a model card: data, steps,
hardware, validation Dice, licence) and ``NAME_template.nii.gz`` (a template image of its space,
for the affine step). Made from a training workdir by ``experiments/export_pretrained.py``.

  model, variables, config = vmjax.pretrained.load()            # the default model
  space = vmjax.pretrained.space()                               # its grid and template
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from flax import serialization
import ml_collections
import numpy as np

from vmjax import io
from vmjax import networks
from vmjax import transfer

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT = "oasis-vm2-diff"


@dataclasses.dataclass
class ModelSpace:
  """Where a model registers: its grid (``shape``, voxel-to-world ``affine``, the training
  scans' 1 mm grid) and a template image in it for the affine step (any grid of that space)."""
  shape: tuple
  affine: np.ndarray
  template: io.Volume


def available() -> list[str]:
  """Names of the shipped models."""
  if not os.path.isdir(WEIGHTS):
    return []
  return sorted(n[:-len(".msgpack")] for n in os.listdir(WEIGHTS) if n.endswith(".msgpack"))


def _path(name: str, suffix: str) -> str:
  path = os.path.join(WEIGHTS, name + suffix)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no pretrained model {name!r} (shipped: {available() or 'none'}; "
                            f"missing {path})")
  return path


@functools.cache
def card(name: str = DEFAULT) -> dict:
  """The model card: ``config``, ``grid`` (shape, affine), ``training`` and ``licence``."""
  with open(_path(name, ".json")) as f:
    return json.load(f)


def load(name: str = DEFAULT):
  """``(model, variables, config)`` of a shipped model, as :func:`vmjax.checkpoints.load_trained`
  returns them from a workdir."""
  config = ml_collections.ConfigDict(card(name)["config"])
  model = networks.model_from_config(config.model)
  # The parameters' own nested dict: no template from the model's init (tracing it cost 0.35 s
  # of each command); a mismatch with the model is one error at the first apply (networks._param).
  with open(_path(name, ".msgpack"), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  return model, {"params": transfer.to_device(params)}, config


def space(name: str = DEFAULT) -> ModelSpace:
  """The grid the model registers on and its template (:class:`ModelSpace`)."""
  grid = card(name)["grid"]
  template = io.load_volume(_path(name, "_template.nii.gz"))
  return ModelSpace(shape=tuple(grid["shape"]), affine=np.asarray(grid["affine"], np.float64),
                    template=template)
