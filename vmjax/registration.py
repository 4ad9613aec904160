"""Registering a pair with a trained network: one jitted forward pass plus the warp."""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from vmjax import checks
from vmjax import data
from vmjax import losses
from vmjax import transforms
from vmjax.networks import VxmDense


@functools.partial(jax.jit, static_argnums=0)
def _register(model: VxmDense, variables, moving: jax.Array, fixed: jax.Array):
  disp = model.apply(variables, moving, fixed)
  return transforms.warp(moving, disp), disp


def register(model: VxmDense, variables, moving: jax.Array, fixed: jax.Array):
  """Registers ``moving`` to ``fixed`` with a trained VoxelMorph network.

  One jit-compiled function: a second call with the same shapes (and the same ``model``) does
  not recompile. Inputs are validated first (rank, shape match, divisibility, NaN/Inf).

  Args:
    model: the ``VxmDense`` module (static: hashed by its configuration).
    variables: its variables (``{"params": ...}``).
    moving, fixed: ``(B, D, H, W, C)`` volumes, spatial sizes divisible by
      ``2**len(model.enc_features)`` (see :func:`pad_to_multiple`).

  Returns:
    ``(moved, disp)``: ``(B, D, H, W, C)`` warped moving image (trilinear) and the
    ``(B, D, H, W, 3)`` displacement in voxels; warp labels with ``warp(seg, disp, order=0)``.
  """
  checks.check_pair(moving, fixed, levels=model.levels)
  return _register(model, variables, moving, fixed)


def pad_to_multiple(x: jax.Array, multiple: int, mode: str = "constant"):
  """Pads the spatial axes of ``(B, D, H, W, C)`` at their end to multiples of ``multiple``.

  Returns:
    ``(padded, spatial_shape)``: crop back with ``padded[:, :D, :H, :W]``.
  """
  shape = tuple(x.shape[1:4])
  target = checks.divisible_shape(shape, multiple)
  pads = [(0, 0)] + [(0, t - n) for t, n in zip(target, shape)] + [(0, 0)]
  return jnp.pad(x, pads, mode=mode), shape


def _network_input(volume, config) -> tuple[jax.Array, tuple]:
  """A scan prepared as in training (normalisation, downsampling), batched."""
  prepared = data.prepare(volume, config.data.normalize, config.data.downsample)
  return jnp.asarray(prepared.image)[None, ..., None], prepared.image.shape


def pair_loss_config(config) -> ml_collections.FrozenConfigDict:
  """The training loss without its label term (a new pair has no labels), hashable for jit."""
  return ml_collections.FrozenConfigDict({**config.loss.to_dict(), "seg_weight": 0.0})


def _pair_loss(model: VxmDense, loss_cfg, params, moving: jax.Array, fixed: jax.Array):
  return losses.compute_loss(params, model, {"moving": moving, "fixed": fixed}, loss_cfg)[0]


# The training loss of one pair (``moving``, ``fixed``: ``(B, D, H, W, C)``).
pair_loss = jax.jit(_pair_loss, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def instance_optimise(model: VxmDense, loss_cfg, steps: int, params, moving: jax.Array,
                      fixed: jax.Array, learning_rate: float):
  """VoxelMorph's instance-specific optimisation: ``steps`` Adam steps on the network's
  parameters for this one pair, with the training loss. Returns the tuned parameters."""
  tx = optax.adam(learning_rate)

  def body(_, carry):
    params, opt_state = carry
    grads = jax.grad(_pair_loss, argnums=2)(model, loss_cfg, params, moving, fixed)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = lax.fori_loop(0, steps, body, (params, tx.init(params)))
  return params


# Adam's step size for instance optimisation unless given. Measured on OASIS-TRT-20 13-15 -> 1
# (VM-2 trained at lr 1e-3, 10 steps): Dice 0.568 without, 0.577 at 1e-4, 0.542 at 1e-3 (the
# training lr overshoots on a single pair).
INSTANCE_LR = 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _inverse_field(model: VxmDense, variables, moving: jax.Array, fixed: jax.Array):
  return model.apply(variables, moving, fixed, bidir=True)[1]


def register_scans(model: VxmDense, variables, config, moving, fixed, instance_steps: int = 0,
                   instance_lr: float | None = None, inverse: bool = False) -> dict:
  """Registers two scans of any size on the same grid, as trained.

  The scans are prepared like the training data (``config.data.normalize``, ``downsample``),
  padded to the network's multiple, registered, and the displacement is cropped back and
  (after downsampling) resized to the full grid, so outputs live on the fixed scan's grid.
  ``instance_steps > 0`` first fine-tunes the network on this pair with the training loss
  (VoxelMorph's instance-specific optimisation; Adam, ``instance_lr``, default
  ``INSTANCE_LR``). Compiled pieces are cached per shape.

  Args:
    moving, fixed: :class:`vmjax.io.Volume` on the same voxel grid.

  Returns:
    dict with ``moved`` (the raw moving image warped, ``(D, H, W)``), ``disp``
    (``(D, H, W, 3)``, voxels of the full grid), ``moved_seg`` (if ``moving.seg``),
    ``loss_before``/``loss_after`` (the training loss on this pair, at network resolution) and
    ``variables`` (fine-tuned if ``instance_steps``); with ``inverse`` (diffeomorphic models:
    the integral of the negated velocity) also ``inverse_disp``, the field that maps the fixed
    scan onto the moving one.
  """
  if inverse and model.int_steps == 0:
    raise ValueError("an inverse field needs a diffeomorphic model (config.model.int_steps > 0)")
  if moving.image.shape != fixed.image.shape:
    raise ValueError(f"moving {moving.path} {moving.image.shape} and fixed {fixed.path} "
                     f"{fixed.image.shape} are on different voxel grids; resample the moving "
                     "scan onto the fixed grid (e.g. after affine alignment) first")
  multiple = 2 ** model.levels
  x_moving, net_shape = _network_input(moving, config)
  x_fixed, _ = _network_input(fixed, config)
  x_moving, _ = pad_to_multiple(x_moving, multiple)
  x_fixed, _ = pad_to_multiple(x_fixed, multiple)
  checks.check_pair(x_moving, x_fixed, levels=model.levels)

  loss_cfg = pair_loss_config(config)
  result = {"loss_before": float(pair_loss(model, loss_cfg, variables["params"], x_moving,
                                           x_fixed))}
  if instance_steps > 0:
    lr = instance_lr or INSTANCE_LR
    params = instance_optimise(model, loss_cfg, int(instance_steps), variables["params"],
                               x_moving, x_fixed, lr)
    variables = {**variables, "params": params}
    result["loss_after"] = float(pair_loss(model, loss_cfg, params, x_moving, x_fixed))
  else:
    result["loss_after"] = result["loss_before"]
  result["variables"] = variables

  def to_full_grid(field):
    """The network's field cropped back and, after downsampling, resized to the full grid."""
    field = field[:, :net_shape[0], :net_shape[1], :net_shape[2]]
    factor = config.data.downsample
    if factor > 1:
      field = transforms.resize_field(field, tuple(n * factor for n in net_shape))
      pads = [(0, 0)] + [(0, f - n) for f, n in zip(moving.image.shape, field.shape[1:4])]
      field = jnp.pad(field, pads + [(0, 0)], mode="edge")
    return field

  _, disp = register(model, variables, x_moving, x_fixed)
  disp = to_full_grid(disp)
  result["disp"] = disp[0]
  if inverse:
    result["inverse_disp"] = to_full_grid(_inverse_field(model, variables, x_moving, x_fixed))[0]
  result.update(warp_volume(moving, disp[0]))
  return result


def warp_volume(volume, disp: jax.Array) -> dict:
  """``moved`` (trilinear) and, if the volume has labels, ``moved_seg`` (nearest) of a
  :class:`vmjax.io.Volume` warped by ``disp`` ``(D, H, W, 3)`` (voxels of the volume's grid;
  the output is on the field's grid)."""
  out = {"moved": transforms.warp(jnp.asarray(volume.image)[None, ..., None],
                                   disp[None])[0, ..., 0]}
  if volume.seg is not None:
    out["moved_seg"] = transforms.warp(jnp.asarray(volume.seg)[None, ..., None], disp[None],
                                       order=0)[0, ..., 0]
  return out
