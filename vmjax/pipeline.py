"""Two scans on any grids in, outputs on the fixed scan's grid out: affine alignment of both
scans to the model's space, the network there, and one displacement that composes both parts.

Coordinates: ``V_m``, ``V_f``, ``S`` are the voxel-to-world matrices of the moving scan, the
fixed scan and the model's grid; ``A_m``, ``A_f`` (:func:`vmjax.affine.affine_register`) map the
model space's world to each scan's world. For a fixed voxel ``x`` the model-grid voxel is
``t = S^-1 A_f^-1 V_f x``, the network's displacement moves it to ``t + d(t)``, and the moving
voxel it samples is ``y = V_m^-1 A_m S (t + d(t))``. The composed field is ``u(x) = y - x`` in
voxel index units (``moved(x) = moving(x + u(x))``, vmjax's convention, which reduces to the
network's own field when both scans are on the model's grid), and the same map in world
coordinates is what :mod:`vmjax.ants_io` writes for ANTs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import numpy as np

from vmjax import affine as affine_lib
from vmjax import kernels
from vmjax import metrics
from vmjax import registration
from vmjax import stages
from vmjax import transfer
from vmjax import transforms
from vmjax.checks import DataError
from vmjax.io import Volume
from vmjax.pretrained import ModelSpace


@dataclasses.dataclass
class Alignment:
  """A scan aligned to a model's space: ``world`` (:func:`vmjax.affine.affine_register`: the
  space's world -> the scan's world) and the scan resampled onto the model's grid."""
  world: np.ndarray
  in_space: Volume


def align_to_space(volume: Volume, space: ModelSpace) -> Alignment:
  """The affine step of :func:`register_native_volumes` for one scan; a fixed scan (an atlas)
  that many moving scans meet is aligned once and handed to :func:`register_native_volumes` as
  ``fixed_alignment``."""
  world = affine_lib.affine_register(volume, space.template)
  return Alignment(world, affine_lib.resample_volume(volume, world, space.affine, space.shape))


def same_grid(a: Volume, b: Volume) -> bool:
  return a.image.shape == b.image.shape and np.allclose(a.affine, b.affine, atol=1e-3)


def compose_on_fixed_grid(fixed: Volume, moving: Volume, space: ModelSpace, a_fixed: np.ndarray,
                          a_moving: np.ndarray, disp: jax.Array | None) -> jax.Array:
  """The composed displacement ``u`` ``(D, H, W, 3)`` on the fixed grid (module docstring);
  ``disp=None``: the affine part alone."""
  to_model = np.linalg.inv(space.affine) @ np.linalg.inv(a_fixed) @ fixed.affine
  to_moving = np.linalg.inv(moving.affine) @ a_moving @ space.affine
  return _composed(tuple(fixed.image.shape), *transfer.to_device((to_model, to_moving), np.float32),
                   disp)


@functools.partial(jax.jit, static_argnums=0)
def _composed(shape, to_model: jax.Array, to_moving: jax.Array, disp: jax.Array | None):
  if disp is None:
    return _composed_xla(shape, to_model, to_moving, None)
  return kernels.on_cpu(lambda d, a, b: kernels.compose_affine(d, a, b, shape),
                        lambda d, a, b: _composed_xla(shape, a, b, d), disp, to_model, to_moving)


def _composed_xla(shape, to_model: jax.Array, to_moving: jax.Array, disp: jax.Array | None):
  grid = transforms.identity_grid(shape)
  t = transforms.apply_affine(to_model, grid)  # x's voxel on the model's grid
  if disp is not None:
    # d(t): the network's field sampled at t, edge values outside the model's grid.
    t = t + transforms.sample(disp[None], t[None], mode="nearest")[0]
  return transforms.apply_affine(to_moving, t) - grid


def world_jacobian(u: jax.Array, fixed: Volume, moving: Volume) -> jax.Array:
  """Jacobian determinant ``(D, H, W)`` of the world map (moving mm per fixed mm) of a field
  between two grids: the index map's, scaled by ``det V_m / det V_f`` (so grids of opposite
  handedness do not read as folds)."""
  scale = np.linalg.det(moving.affine[:3, :3]) / np.linalg.det(fixed.affine[:3, :3])
  return metrics.jacobian_determinant(u[None])[0] * scale


def register_native_volumes(model, variables, config, moving: Volume, fixed: Volume,
                            space: ModelSpace | None = None, affine: str = "affine",
                            instance: registration.InstanceOptimisation | None = None,
                            deformable: bool = True, inverse: bool = False,
                            diagnostics: bool = True,
                            fixed_alignment: Alignment | None = None) -> dict:
  """Registers ``moving`` to ``fixed``, each on its own grid, through the model's space.

  Args:
    affine: ``"affine"``: both scans are aligned (rigid, then affine) to ``space.template``,
      resampled onto the model's grid, registered there, and the result composed back onto the
      fixed grid; ``"none"``: the scans are already aligned and on one grid (else a
      :class:`DataError`), registered directly as
      :func:`vmjax.registration.register_aligned_volumes`.
    instance: test-time optimisation in the model's space after the network
      (:class:`vmjax.registration.InstanceOptimisation`; None: none).
    deformable: False stops after the affine step (its result alone, no network).
    inverse: also ``inverse_disp`` (diffeomorphic models): the same map backwards, as a field on
      the moving grid (fixed voxel = y + inverse_disp(y)).
    diagnostics: also ``affine_moved_seg`` and ``jacobian_det`` (for evaluation; a command that
      writes neither computes neither).
    fixed_alignment: the fixed scan's :func:`align_to_space`, when already computed.

  Returns:
    dict with ``disp`` (``(D, H, W, 3)`` on the fixed grid, moving voxel = x + disp),
    ``moved``, ``moved_seg`` (if the moving scan has labels), ``affine_moved_seg`` (the labels
    after the affine part alone), ``world`` (4x4: fixed world -> moving world of the affine part;
    identity with ``affine="none"``), ``jacobian_det`` (:func:`world_jacobian`),
    ``loss_before`` / ``loss_after`` (the network's loss in the model space) and ``steps`` (the
    instance steps taken), both with ``deformable``.
  """
  return register_native_volume_batch(model, variables, config, [(moving, fixed)], space,
                                      affine, instance, deformable, inverse, diagnostics,
                                      [fixed_alignment])[0]


def register_native_volume_batch(model, variables, config, pairs, space: ModelSpace | None = None,
                                 affine: str = "affine",
                                 instance: registration.InstanceOptimisation | None = None,
                                 deformable: bool = True, inverse: bool = False,
                                 diagnostics: bool = True, fixed_alignments=None) -> list[dict]:
  """:func:`register_native_volumes` of several ``(moving, fixed)`` pairs, each on its own
  grids: the affine steps, resampling, composition and warps per pair, the network and the
  refinement for all of them in one batch on the model's grid (:func:`vmjax.registration.
  register_aligned_volume_batch`: each pair gets the result it gets alone, up to rounding).
  With ``affine="none"`` the pairs' grids must share one shape. ``fixed_alignments``: per pair,
  the fixed scan's :func:`align_to_space` or None. Returns one dict per pair."""
  if affine not in ("affine", "none"):
    raise ValueError(f"affine must be 'affine' or 'none', got {affine!r}")
  if affine == "none":
    for moving, fixed in pairs:
      if not same_grid(moving, fixed):
        raise DataError(
            f"--affine=none needs both scans on one voxel grid, but moving {moving.path} "
            f"{moving.image.shape} and fixed {fixed.path} {fixed.image.shape} differ in shape "
            "or affine; use --affine=affine to align them first")
    outs = registration.register_aligned_volume_batch(model, variables, config, pairs,
                                                      instance, inverse)
    for (moving, fixed), out in zip(pairs, outs):
      out["world"] = np.eye(4)
      if diagnostics:
        out["affine_moved_seg"] = moving.seg
        out["jacobian_det"] = world_jacobian(out["disp"], fixed, moving)
    return outs
  if space is None:
    raise ValueError("affine='affine' needs the model's space (vmjax.pretrained.space(...))")
  fixed_alignments = list(fixed_alignments or [None] * len(pairs))
  worlds = [_affine_steps(moving, fixed, space, alignment)
            for (moving, fixed), alignment in zip(pairs, fixed_alignments)]
  outs = [None] * len(pairs)
  if deformable:
    with stages.stage("resample both to the model grid"):
      in_space = stages.sync([
          (affine_lib.resample_volume(moving, a_moving, space.affine, space.shape),
           alignment.in_space if alignment is not None else
           affine_lib.resample_volume(fixed, a_fixed, space.affine, space.shape))
          for (moving, fixed), (a_moving, a_fixed), alignment
          in zip(pairs, worlds, fixed_alignments)])
    outs = registration.register_aligned_volume_batch(model, variables, config, in_space,
                                                      instance, inverse, warp=False)
  return [_on_fixed_grid(moving, fixed, space, a_moving, a_fixed, out, inverse, diagnostics)
          for (moving, fixed), (a_moving, a_fixed), out in zip(pairs, worlds, outs)]


def _affine_steps(moving: Volume, fixed: Volume, space: ModelSpace,
                  fixed_alignment: Alignment | None) -> tuple[np.ndarray, np.ndarray]:
  """``(A_m, A_f)``: both scans aligned to the model's template (the fixed one's given), side
  by side: XLA:CPU keeps 2 cores only partly busy with one alignment's small volumes, and one
  thread's tracing overlaps the other's steps (2-core AMD EPYC Zen 4: 2.7 -> 2.3 s warm)."""
  if fixed_alignment is not None:
    with stages.stage("affine: moving to template"):
      return affine_lib.affine_register(moving, space.template), fixed_alignment.world
  with stages.stage("affine: both scans to template (side by side)"):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      a_fixed = pool.submit(affine_lib.affine_register, fixed, space.template)
      return affine_lib.affine_register(moving, space.template), a_fixed.result()


def _on_fixed_grid(moving: Volume, fixed: Volume, space: ModelSpace, a_moving: np.ndarray,
                   a_fixed: np.ndarray, out: dict | None, inverse: bool,
                   diagnostics: bool) -> dict:
  """One pair's result on the fixed grid from the model space's ``out`` (None: the affine
  part alone): the composed field(s), the warped scan and labels, the diagnostics."""
  result = {"world": a_moving @ np.linalg.inv(a_fixed)}
  u_affine = None
  if diagnostics or out is None:
    u_affine = compose_on_fixed_grid(fixed, moving, space, a_fixed, a_moving, None)
  if diagnostics and moving.seg is not None:
    result["affine_moved_seg"] = registration.warp_volume(moving, u_affine)["moved_seg"]
  if out is not None:
    with stages.stage("compose onto the fixed grid"):
      u = stages.sync(compose_on_fixed_grid(fixed, moving, space, a_fixed, a_moving,
                                            out["disp"]))
      if inverse:  # the same composition with the roles of the scans swapped
        result["inverse_disp"] = stages.sync(compose_on_fixed_grid(
            moving, fixed, space, a_moving, a_fixed, out["inverse_disp"]))
    result.update(loss_before=out["loss_before"], loss_after=out["loss_after"],
                  steps=out["steps"], variables=out["variables"])
  else:
    u = u_affine
    if inverse:
      result["inverse_disp"] = compose_on_fixed_grid(moving, fixed, space, a_moving, a_fixed,
                                                     None)
  result["disp"] = u
  if diagnostics:
    result["jacobian_det"] = world_jacobian(u, fixed, moving)
  with stages.stage("warp the moving scan (and labels)"):
    result.update(stages.sync(registration.warp_volume(moving, u)))
  return result
