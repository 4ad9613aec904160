"""Registering a pair with a trained network: one jitted forward pass plus the warp, and
instance optimisation (NAdam / Adam on this pair's training loss) of its field or its
parameters."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vmjax import checks
from vmjax import data
from vmjax import losses
from vmjax import stages
from vmjax import transfer
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
  """Pads the spatial axes of ``(B, D, H, W, C)`` at their end to multiples of ``multiple`` (a
  numpy array in numpy, on the host).

  Returns:
    ``(padded, spatial_shape)``: crop back with ``padded[:, :D, :H, :W]``.
  """
  shape = tuple(x.shape[1:4])
  target = checks.divisible_shape(shape, multiple)
  pads = [(0, 0)] + [(0, t - n) for t, n in zip(target, shape)] + [(0, 0)]
  return (np if isinstance(x, np.ndarray) else jnp).pad(x, pads, mode=mode), shape


def _network_input(volume, config) -> tuple[np.ndarray, tuple]:
  """A scan prepared as in training (normalisation, downsampling), batched, on the host."""
  prepared = data.prepare(volume, config.data.normalize, config.data.downsample)
  return prepared.image[None, ..., None], prepared.image.shape


def pair_loss_config(config) -> ml_collections.FrozenConfigDict:
  """The training loss without its label term (a new pair has no labels), hashable for jit."""
  return ml_collections.FrozenConfigDict({**config.loss.to_dict(), "seg_weight": 0.0})


def _pair_loss(model: VxmDense, loss_cfg, params, moving: jax.Array, fixed: jax.Array):
  return losses.compute_loss(params, model, {"moving": moving, "fixed": fixed}, loss_cfg)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fields(model: VxmDense, bidir: bool, velocity_only: bool, variables, moving: jax.Array,
            fixed: jax.Array):
  """The network's fields; ``velocity_only``: its velocity alone (a refinement starts from it:
  XLA then drops the integration and resizing of a field that would be thrown away)."""
  fields = model.apply(variables, moving, fixed, bidir=bidir, method=type(model).fields)
  return {"velocity": fields["velocity"]} if velocity_only else fields


@functools.partial(jax.jit, static_argnums=(0, 1))
def _field_loss(model: VxmDense, loss_cfg, velocity: jax.Array, moving: jax.Array,
                fixed: jax.Array):
  fields = model.fields_from_velocity(velocity, moving.shape[1:4], bidir=loss_cfg.bidir)
  return losses.field_loss(fields, moving, fixed, loss_cfg)[0]


def _per_pair(loss: Callable, *batched):
  """``loss`` (a scalar of batch-1 arguments) of each item of ``batched`` (pytrees whose leaves
  lead with the batch axis), ``(B,)``: the call itself for one item, else vmapped with each
  item given its batch axis back."""
  if jax.tree_util.tree_leaves(batched)[0].shape[0] == 1:
    return loss(*batched)[None]
  one = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)
  return jax.vmap(lambda *items: loss(*map(one, items)))(*batched)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fields_and_losses(model: VxmDense, loss_cfg, inverse: bool, velocity: jax.Array,
                       moving: jax.Array, fixed: jax.Array):
  """``(fields, losses (B,))``: the model's fields of one velocity (with ``inverse``) and
  :func:`_pair_field_losses` at it in one program, sharing its integration and resizing."""
  fields = model.fields_from_velocity(velocity, moving.shape[1:4],
                                      bidir=inverse or loss_cfg.bidir)
  per_pair = _per_pair(lambda f, m, x: losses.field_loss(f, m, x, loss_cfg)[0],
                       fields, moving, fixed)
  if not inverse:
    fields = {k: v for k, v in fields.items() if k != "inverse"}
  return fields, per_pair


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pair_field_losses(model: VxmDense, loss_cfg, velocity: jax.Array, moving: jax.Array,
                       fixed: jax.Array):
  """:func:`_field_loss` of each pair of a batch, ``(B,)``."""
  return _per_pair(functools.partial(_field_loss, model, loss_cfg), velocity, moving, fixed)


# Convergence is judged over this many steps (InstanceOptimisation.tol).
CONVERGENCE_WINDOW = 5


_OPTIMISERS = {"Adam": optax.adam, "NAdam": optax.nadam}


def _adam(loss: Callable, steps: int, x, learning_rate: float, tol: float = 0.0,
          optimiser: str = "Adam"):
  """Up to ``steps`` steps of Adam from ``x`` (any pytree) on ``loss(x)``; ``optimiser="NAdam"``:
  with Nesterov's momentum (Dozat 2016: each step looks ahead along the momentum).

  ``loss(x)`` is a scalar, or the losses ``(B,)`` of ``B`` independent items whose parameters
  are the leading axis of every leaf of ``x`` (a batch of pairs): Adam then minimises their
  sum, which moves each item by its own loss's gradient.

  ``tol > 0``: each item stops once converged, when its last :data:`CONVERGENCE_WINDOW` steps
  lowered its loss by less than ``tol`` times its whole decrease since the start (scale-free:
  no loss units; at least that many steps); a stopped item keeps its iterate while the others go
  on, so it ends where it would alone. Returns ``(x, steps taken, loss(x) at the start)``:
  with ``tol`` and a vector loss the steps of each item ``(B,)``, otherwise one count for all;
  the start's loss (evaluated with the first step's gradient, at no extra cost) with ``tol``
  only, None without (where it would cost one more trace of the loss)."""
  tx = _OPTIMISERS[optimiser](learning_rate)
  if not tol:
    grad = jax.grad(lambda x: jnp.sum(loss(x)))

    def body(_, carry):
      x, opt_state = carry
      updates, opt_state = tx.update(grad(x), opt_state, x)
      return optax.apply_updates(x, updates), opt_state

    return (lax.fori_loop(0, steps, body, (x, tx.init(x)))[0], jnp.asarray(steps, jnp.int32),
            None)

  window = CONVERGENCE_WINDOW
  items = jax.eval_shape(loss, x).shape  # () or (B,)
  value_and_grad = jax.value_and_grad(lambda x: (lambda v: (jnp.sum(v), v))(loss(x)),
                                      has_aux=True)

  def per_item(mask, leaf):  # (B,) -> broadcastable against a leaf whose leading axis is B
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))

  def body(carry):
    k, x, opt_state, recent, first, converged, taken = carry
    (_, value), grad = value_and_grad(x)  # the losses at x_k, before step k
    first = jnp.where(k == 0, value, first)
    earlier = recent[k % window]  # the losses at x_{k - window}
    recent = recent.at[k % window].set(value)
    active = ~converged  # items still stepping take step k, then may stop
    updates, opt_state = tx.update(grad, opt_state, x)
    x = jax.tree_util.tree_map(lambda new, old: jnp.where(per_item(active, old), new, old),
                               optax.apply_updates(x, updates), x)
    converged = converged | ((k >= window) & (earlier - value < tol * (first - value)))
    return k + 1, x, opt_state, recent, first, converged, taken + active

  def cond(carry):
    k, *_, converged, _ = carry
    return (k < steps) & ~jnp.all(converged)

  start = (jnp.asarray(0, jnp.int32), x, tx.init(x), jnp.zeros((window,) + items, jnp.float32),
           jnp.zeros(items, jnp.float32), jnp.zeros(items, bool), jnp.zeros(items, jnp.int32))
  _, x, _, _, first, _, taken = lax.while_loop(cond, body, start)
  return x, taken, first


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def instance_optimise(model: VxmDense, loss_cfg, steps: int, params, moving: jax.Array,
                      fixed: jax.Array, learning_rate: float):
  """VoxelMorph's instance-specific optimisation: ``steps`` Adam steps on the network's
  parameters for this one pair, with the training loss. Returns the tuned parameters."""
  return _adam(lambda p: _pair_loss(model, loss_cfg, p, moving, fixed), steps, params,
               learning_rate, optimiser=INSTANCE_OPTIMISER["network"])[0]


def pool(x: jax.Array, factor: int) -> jax.Array:
  """Average of ``factor``^3 blocks of ``(B, D, H, W, C)`` (spatial sizes divisible by it)."""
  if factor == 1:
    return x
  b, d, h, w, c = x.shape
  return x.reshape(b, d // factor, factor, h // factor, factor, w // factor, factor,
                   c).mean(axis=(2, 4, 6))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 7))
def refine_velocity(model: VxmDense, loss_cfg, schedule, velocity: jax.Array,
                    moving: jax.Array, fixed: jax.Array, learning_rate: float, tol: float = 0.0):
  """Instance optimisation of the field, coarse to fine: NAdam (Adam with Nesterov's momentum;
  fewer steps than Adam to the same Dice, :data:`INSTANCE_OPTIMISER`) on the network's output
  ``velocity`` (``(B, d, h, w, 3)``, the field before integration, at ``1/int_downsize``
  resolution in diffeomorphic models) for this one pair, with the training loss (the same image
  and smoothness terms, the same integration: the field stays diffeomorphic). The network only
  initialises it; each step costs a warp and the loss, not a pass through the U-Net.

  ``schedule``: ``((factor, steps), ...)``, coarse to fine (an int ``steps`` means
  ``((1, steps),)``): up to ``steps`` steps with both images averaged over ``factor``^3
  blocks. Where that grid is coarser than the velocity's, the step optimises a correction on the
  coarse grid and integrates there (each step ``~factor^3`` times cheaper), and the correction
  is resized back onto the velocity; otherwise the velocity itself is optimised against the
  pooled images. The optimiser starts afresh at each level. ``tol > 0``: each level stops early once
  converged (:func:`_adam`).

  A batch of pairs is refined as each pair alone would be (NAdam on the sum of their losses
  moves each pair's velocity by its own loss's gradient; with ``tol`` each pair stops when it
  converges, and the others go on). Returns ``(velocity, steps taken over all levels (B,),
  the starting velocity's loss (B,))``; the loss is the first step's (no extra evaluation) where
  the schedule starts at full size with ``tol``, else None."""
  taken = jnp.zeros(velocity.shape[0], jnp.int32)
  start_loss = None
  for level, (factor, steps) in enumerate(normalise_schedule(schedule)):
    m, f = pool(moving, factor), pool(fixed, factor)
    level_shape = m.shape[1:4]
    if all(n >= v for n, v in zip(level_shape, velocity.shape[1:4])):
      velocity, k, first = _adam(lambda v, m=m, f=f: _pair_field_losses(model, loss_cfg, v, m, f),
                                 steps, velocity, learning_rate, tol,
                                 INSTANCE_OPTIMISER["field"])
      taken = taken + k
      if level == 0 and factor == 1:
        start_loss = first
      continue
    base = transforms.resize_field(velocity, level_shape)
    correction, k, _ = _adam(lambda d, base=base, m=m, f=f:
                             _pair_field_losses(model, loss_cfg, base + d, m, f),
                             steps, jnp.zeros_like(base), learning_rate, tol,
                             INSTANCE_OPTIMISER["field"])
    taken = taken + k
    velocity = velocity + transforms.resize_field(correction, velocity.shape[1:4])
  return velocity, taken, start_loss


def normalise_schedule(schedule) -> tuple[tuple[int, int], ...]:
  """``((factor, steps), ...)`` from an int (steps at full resolution) or such pairs, without
  levels of 0 steps; factors must be powers of two."""
  if isinstance(schedule, int):
    schedule = ((1, schedule),)
  out = []
  for factor, steps in schedule:
    factor, steps = int(factor), int(steps)
    if factor < 1 or factor & (factor - 1):
      raise ValueError(f"refinement levels take a power-of-two factor, got {factor}")
    if steps < 0:
      raise ValueError(f"refinement steps must be >= 0, got {steps}")
    if steps:
      out.append((factor, steps))
  return tuple(out)


# Defaults per target (docs/results.md, instance optimisation; shipped 1 mm model, bf16 network,
# 2-core AMD EPYC, 2026-11-26). "field": chosen on the validation pairs 13->14, 14->15, 15->13
# (prepared, 1 mm; Dice before 0.615): the smoothness weight 0.25 / 0.1 / 0.05 gave 0.656 /
# 0.660 / 0.661 after 25 steps with 0.011 / 0.045 / 0.096 % non-positive Jacobian, and 0.1 after
# 50 steps 0.662 (0.054 %): the lowest weight that keeps folding well under 0.1 %. The rate (in
# voxels of the velocity's grid per step) with the convergence rule below, on the same pairs
# (2026-12-06): lr 0.2 / tol 0.02 stopped after 31 steps at 0.6603, lr 0.3 after 30 at 0.6615,
# lr 0.4 after 30 at 0.6620, and lr 0.4 / tol 0.05 after 21-22 steps at 0.6606 (0.048 %): the
# same Dice in 2/3 of the steps. "network": VM-2 trained at lr 1e-3 at 2 mm, 10 steps on
# 13-15 -> 1: 0.568 without, 0.577 at lr 1e-4, 0.542 at 1e-3 (the training lr overshoots on a
# single pair); the training's smoothness weight.
INSTANCE_LR = {"field": 0.4, "network": 1e-4}
# The optimiser per target. "field" (2026-12-06, the validation pairs above, lr 0.4, the rule
# below): Nesterov's momentum (NAdam) converged after 16 steps at Dice 0.6601 (loss -0.4416 on
# 13->14) where Adam took 21-22 to 0.6606 (-0.4400); after a fixed 10 steps 0.6585 against
# Adam's 0.6552; on the test pairs (native / prepared) converged 0.6860 / 0.6594 (Adam 0.6849 /
# 0.6597), 10 steps 0.6839 / 0.6577 (Adam 0.6807 / 0.6545). Also tried on the validation pairs:
# Adam with b2 0.99 (0.6604, 21-22 steps); Adam with a rate cosine-decayed over 12-15 steps
# (0.6475-0.6547); Adam on Gaussian-smoothed gradients (0.6571-0.6590, 25-27 steps); the
# integration's gradient taken as the identity (0.6341-0.6391: the loss stalls). "network":
# Adam, as trained (untested with NAdam).
INSTANCE_OPTIMISER = {"field": "NAdam", "network": "Adam"}
INSTANCE_LAM = {"field": 0.1, "network": None}  # None: config.loss.lam
# The commands' refinement (vmjax-register, vmjax-evaluate): up to DEFAULT_STEPS steps, stopped
# once converged at DEFAULT_TOL: the last 5 steps lowered the loss by less than 5 % of its
# decrease so far (docs/results.md: with Adam 21-22 steps on the validation pairs, on the test
# pairs Dice 0.0016 / 0.0008 below lr 0.2's 31 steps, native / prepared, a quarter less time per
# pair; with NAdam 15-16 steps). --fast: FAST_STEPS.
DEFAULT_STEPS, DEFAULT_TOL, FAST_STEPS = 50, 0.05, 10


@dataclasses.dataclass(frozen=True)
class InstanceOptimisation:
  """Test-time optimisation of one pair's training loss after the network's prediction.

  Attributes:
    steps: optimiser steps at full resolution (0 and no ``coarse``: the network's field as is).
    coarse: ``((factor, steps), ...)`` run first, coarse to fine, target ``"field"`` only:
      steps against both images averaged over ``factor``^3 blocks (:func:`refine_velocity`).
    lr: the optimiser's (:data:`INSTANCE_OPTIMISER`) learning rate; None:
      ``INSTANCE_LR[target]``.
    lam: the smoothness weight of the optimised loss; None: ``INSTANCE_LAM[target]`` (or the
      training's ``config.loss.lam`` where that is None).
    target: ``"field"`` refines the network's velocity for this pair (:func:`refine_velocity`;
      cheap: no U-Net pass per step); ``"network"`` fine-tunes the network's parameters
      (:func:`instance_optimise`, VoxelMorph TMI'19's instance-specific optimisation).
    tol: target ``"field"``: each level stops before its ``steps`` once converged, when its
      last :data:`CONVERGENCE_WINDOW` steps lowered the loss by less than ``tol`` times the
      decrease since the level began (0: always every step).
  """
  steps: int = 0
  lr: float | None = None
  lam: float | None = None
  target: str = "field"
  coarse: tuple = ()
  tol: float = 0.0

  def __post_init__(self):
    if self.target not in INSTANCE_LR:
      raise ValueError(f"instance optimisation target must be one of {tuple(INSTANCE_LR)}, "
                       f"got {self.target!r}")
    if self.steps < 0:
      raise ValueError(f"instance optimisation steps must be >= 0, got {self.steps}")
    if self.lam is not None and self.lam < 0:
      raise ValueError(f"instance optimisation smoothness weight must be >= 0, got {self.lam}")
    if not 0 <= self.tol < 1:
      raise ValueError(f"instance optimisation tolerance must be in [0, 1), got {self.tol}")
    if self.tol and self.target != "field":
      raise ValueError("a convergence tolerance stops the refinement of the field "
                       "(target 'field'), not the network's fine-tuning")
    object.__setattr__(self, "coarse", normalise_schedule(tuple(self.coarse)))
    if self.coarse and self.target != "field":
      raise ValueError("coarse instance optimisation levels refine the field "
                       "(target 'field'), not the network")

  @property
  def total_steps(self) -> int:
    return self.steps + sum(steps for _, steps in self.coarse)

  @property
  def schedule(self) -> tuple[tuple[int, int], ...]:
    """:func:`refine_velocity`'s schedule: the coarse levels, then ``steps`` at full size."""
    return normalise_schedule(self.coarse + ((1, self.steps),))

  @property
  def learning_rate(self) -> float:
    return self.lr or INSTANCE_LR[self.target]

  def loss_config(self, config) -> ml_collections.FrozenConfigDict:
    """The loss it optimises: :func:`pair_loss_config` with its smoothness weight."""
    loss_cfg = pair_loss_config(config)
    lam = self.lam if self.lam is not None else INSTANCE_LAM[self.target]
    if not self.total_steps or lam is None:
      return loss_cfg
    return ml_collections.FrozenConfigDict({**loss_cfg.as_configdict().to_dict(), "lam": lam})

  def describe(self, config, taken: int | None = None) -> str:
    """What it does, for a log line: the plan, or with ``taken`` the steps it took."""
    if not self.total_steps:
      return "no instance steps"
    levels = " + ".join(f"{steps} at 1/{factor}" if factor > 1 else f"{steps} at full size"
                        for factor, steps in self.schedule)
    if taken is None:
      count = f"{'up to ' if self.tol else ''}{self.total_steps}"
      until = f" until converged (tol {self.tol:g})" if self.tol else ""
    else:
      count = str(taken)
      converged = "converged; " if taken < self.total_steps else ""
      until = f" ({converged}up to {self.total_steps}, tol {self.tol:g})" if self.tol else ""
    return (f"{count} instance steps on the {self.target}{until} "
            f"{'(' + levels + ') ' if self.coarse else ''}({INSTANCE_OPTIMISER[self.target]}, lr "
            f"{self.learning_rate:g}, smoothness weight {self.loss_config(config).lam:g})")


def register_aligned_volumes(model: VxmDense, variables, config, moving, fixed,
                             instance: InstanceOptimisation | None = None,
                             inverse: bool = False, warp: bool = True) -> dict:
  """Registers two scans of any size on the same grid, as trained.

  The scans are prepared like the training data (``config.data.normalize``, ``downsample``),
  padded to the network's multiple, registered, and the displacement is cropped back and
  (after downsampling) resized to the full grid, so outputs live on the fixed scan's grid.
  ``instance.steps > 0`` then optimises this pair's training loss (:class:`InstanceOptimisation`:
  the network's field or its parameters; None: none). Compiled pieces are cached per shape.
  :func:`register_aligned_volume_batch` does the same for several pairs in one batch.

  Args:
    moving, fixed: :class:`vmjax.io.Volume` on the same voxel grid.

  Returns:
    dict with ``moved`` (the raw moving image warped, ``(D, H, W)``), ``disp``
    (``(D, H, W, 3)``, voxels of the full grid), ``moved_seg`` (if ``moving.seg``),
    ``loss_before``/``loss_after`` (the loss instance optimisation minimises: the training
    loss on this pair at network resolution, with its smoothness weight), ``steps`` (the
    instance steps taken: fewer than ``instance.total_steps`` when ``instance.tol`` stopped them) and
    ``variables`` (fine-tuned if ``instance.target == "network"``); with ``inverse`` (diffeomorphic
    models: the integral of the negated velocity) also ``inverse_disp``, the field that maps the
    fixed scan onto the moving one.
  """
  return register_aligned_volume_batch(model, variables, config, [(moving, fixed)], instance,
                                       inverse, warp)[0]


def register_aligned_volume_batch(model: VxmDense, variables, config, pairs,
                                  instance: InstanceOptimisation | None = None,
                                  inverse: bool = False, warp: bool = True) -> list[dict]:
  """:func:`register_aligned_volumes` of several ``(moving, fixed)`` pairs, all on grids of one
  shape, as one batch: one network call and one field refinement for all of them (each pair's
  result is the one it gets alone, up to rounding). Fine-tuning the network (``instance.target ==
  "network"``) is per pair: those pairs run one at a time. ``warp=False``: the fields alone (no
  ``moved`` / ``moved_seg``). Returns one dict per pair."""
  if inverse and model.int_steps == 0:
    raise ValueError("an inverse field needs a diffeomorphic model (config.model.int_steps > 0)")
  instance = instance or InstanceOptimisation()
  if not pairs:
    return []
  if instance.total_steps > 0 and instance.target == "network" and len(pairs) > 1:
    return [register_aligned_volume_batch(model, variables, config, [pair], instance, inverse,
                                          warp)[0] for pair in pairs]
  for moving, fixed in pairs:
    if moving.image.shape != fixed.image.shape:
      raise ValueError(f"moving {moving.path} {moving.image.shape} and fixed {fixed.path} "
                       f"{fixed.image.shape} are on different voxel grids; resample the moving "
                       "scan onto the fixed grid (e.g. after affine alignment) first")
    if moving.image.shape != pairs[0][0].image.shape:
      raise ValueError(f"a batch of pairs shares one grid shape: {moving.path} is "
                       f"{moving.image.shape}, {pairs[0][0].path} {pairs[0][0].image.shape}")
  multiple = 2 ** model.levels
  inputs = [[_network_input(scan, config) for scan in pair] for pair in pairs]
  net_shape = inputs[0][0][1]
  # Batched and padded on the host: one copy to the device, no program per shape.
  x_moving, x_fixed = transfer.to_device(
      [pad_to_multiple(np.concatenate([pair[k][0] for pair in inputs]), multiple)[0]
       for k in (0, 1)], np.float32)
  checks.check_pair(x_moving, x_fixed, levels=model.levels)

  loss_cfg = instance.loss_config(config)
  # The inverse of the network's own field only when nothing refines it afterwards.
  with stages.stage("network"):
    fields = stages.sync(_fields(model, inverse and not instance.total_steps,
                                 instance.total_steps > 0 and instance.target == "field",
                                 variables, x_moving, x_fixed))
  velocity = fields["velocity"]
  network_velocity = velocity
  loss_before = None  # the refinement's first step evaluates it where it starts at full size
  loss_after = None  # the refined fields' program evaluates it
  steps_taken = [instance.total_steps] * len(pairs)
  if instance.total_steps > 0:
    lr = instance.learning_rate
    if instance.target == "field":
      with stages.stage("refinement"):
        velocity, steps_taken, loss_before = stages.sync(refine_velocity(
            model, loss_cfg, instance.schedule, velocity, x_moving, x_fixed, lr, instance.tol))
        steps_taken = np.asarray(steps_taken).tolist()  # (iterating the array is a program)
      with stages.stage("fields and loss of the refined velocity"):
        fields, loss_after = stages.sync(_fields_and_losses(model, loss_cfg, inverse, velocity,
                                                            x_moving, x_fixed))
    else:
      params = instance_optimise(model, loss_cfg, int(instance.steps), variables["params"],
                                 x_moving, x_fixed, lr)
      variables = {**variables, "params": params}
      fields = _fields(model, inverse, False, variables, x_moving, x_fixed)
      velocity = fields["velocity"]
  with stages.stage("loss before/after (for the log)"):
    if loss_before is None:
      loss_before = stages.sync(_pair_field_losses(model, loss_cfg, network_velocity, x_moving,
                                                   x_fixed))
    if loss_after is None:
      loss_after = loss_before if not instance.total_steps else stages.sync(
          _pair_field_losses(model, loss_cfg, velocity, x_moving, x_fixed))

  full_shape = tuple(pairs[0][0].image.shape)
  with stages.stage("each pair's field on its grid"):
    on_grid = functools.partial(_pairs_on_full_grid, net_shape=tuple(net_shape),
                                factor=config.data.downsample, full_shape=full_shape)
    disp = stages.sync(on_grid(fields["disp"]))
    inverse_disp = stages.sync(on_grid(fields["inverse"])) if inverse else None
  results = []
  loss_before, loss_after = np.asarray(loss_before), np.asarray(loss_after)
  for i, (moving, _) in enumerate(pairs):
    result = {"loss_before": float(loss_before[i]), "loss_after": float(loss_after[i]),
              "steps": steps_taken[i], "variables": variables, "disp": disp[i]}
    if inverse:
      result["inverse_disp"] = inverse_disp[i]
    if warp:
      with stages.stage("warp the moving scan (and labels)"):
        result.update(stages.sync(warp_volume(moving, disp[i])))
    results.append(result)
  return results


@functools.partial(jax.jit, static_argnames=("net_shape", "factor", "full_shape"))
def _pairs_on_full_grid(field: jax.Array, net_shape, factor: int, full_shape) -> tuple:
  """Each pair's field ``(D, H, W, 3)`` of the network's ``(B, ...)``: cropped back to
  ``net_shape`` and, after downsampling by ``factor``, resized to the full grid (one program:
  eager, the crop, the resizing and each pair's slice would each be one)."""
  field = field[:, :net_shape[0], :net_shape[1], :net_shape[2]]
  if factor > 1:
    field = transforms.resize_field(field, tuple(n * factor for n in net_shape))
    pads = [(0, 0)] + [(0, f - n) for f, n in zip(full_shape, field.shape[1:4])]
    field = jnp.pad(field, pads + [(0, 0)], mode="edge")
  return tuple(field[i] for i in range(field.shape[0]))


def warp_volume(volume, disp: jax.Array) -> dict:
  """``moved`` (trilinear) and, if the volume has labels, ``moved_seg`` (nearest) of a
  :class:`vmjax.io.Volume` warped by ``disp`` ``(D, H, W, 3)`` (voxels of the volume's grid;
  the output is on the field's grid)."""
  return _warped(*transfer.to_device((volume.image, volume.seg)), disp)


@jax.jit
def _warped(image: jax.Array, seg: jax.Array | None, disp: jax.Array) -> dict:
  out = {"moved": transforms.warp(image[None, ..., None], disp[None])[0, ..., 0]}
  if seg is not None:
    out["moved_seg"] = transforms.warp(seg[None, ..., None], disp[None], order=0)[0, ..., 0]
  return out
