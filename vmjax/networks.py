"""The VoxelMorph network: a 3-D U-Net that maps a (moving, fixed) pair to a displacement field."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmjax import blocks
from vmjax import checks
from vmjax import precision
from vmjax import transforms

VM1_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32, 8, 8))
VM2_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))
VARIANTS = {"vm1": VM1_FEATURES, "vm2": VM2_FEATURES}


def _param(module: nn.Module, name: str, init, shape: tuple) -> jax.Array:
  """``module.param(name, init, shape, float32)``, but a parameter that exists (every apply) is
  checked against ``shape`` directly: flax checks it by tracing ``init`` (``jax.eval_shape`` of a
  truncated normal: ~7 ms a parameter, 0.17 s of the 0.37 s it took to trace the shipped model's
  forward pass; 2-core AMD EPYC Zen 4, 2026-12-06)."""
  if not module.has_variable("params", name):
    return module.param(name, init, shape, jnp.float32)
  value = module.get_variable("params", name)
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"parameter {name!r} of {'/'.join(module.scope.path)} has shape "
                     f"{tuple(value.shape)} but the model's configuration needs {tuple(shape)}: "
                     "the weights were trained with another configuration (config.model)")
  return value


class ConvBlock(nn.Module):
  """3x3x3 convolution + bias (+ LeakyReLU 0.2), ``(B, D, H, W, Cin) -> (B, D', H', W', features)``.

  The parameters are those of ``nn.Conv(features, (3, 3, 3))`` (``kernel`` ``(3, 3, 3, Cin,
  features)``, ``bias``), with explicit padding 1 as VoxelMorph's PyTorch code (a stride-2 conv is
  centred on even voxels), computed by :func:`vmjax.blocks.unet_block` (oneDNN on CPU, XLA's
  elsewhere). ``remat``: ``jax.checkpoint`` per block (see :func:`vmjax.blocks.conv_block` for
  what it saves where).
  """
  features: int
  stride: int = 1
  activation: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  out_dtype: Any = None  # float32 with a bfloat16 dtype: blocks.conv_block_f32_out
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    """``x`` ``(B, D, H, W, Cin)``; with ``skip`` ``(B, 2D, 2H, 2W, Cs)`` (stride 1 only) the
    block's input is ``concat([upsample2(x), skip])`` (``Cin + Cs`` kernel input channels)."""
    cin = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    kernel = _param(self, "kernel", self.kernel_init, (3, 3, 3, cin, self.features))
    bias = _param(self, "bias", self.bias_init, (self.features,))
    return blocks.unet_block(x, kernel, bias, stride=self.stride,
                             negative_slope=0.2 if self.activation else None, dtype=self.dtype,
                             skip=skip, out_dtype=self.out_dtype, remat=self.remat)


class Unet(nn.Module):
  """VoxelMorph's U-Net (Balakrishnan et al. 2019, fig. 3).

  Encoder: one stride-2 3x3x3 conv + LeakyReLU(0.2) per entry of ``enc_features``. Decoder: for
  each encoder level (coarsest first) a 3x3x3 conv, x2 nearest upsampling and concatenation with
  the encoder activation of that resolution (the input itself at full resolution); the remaining
  ``dec_features`` are convs at full resolution.

  Input ``(B, D, H, W, C)``, every spatial size divisible by ``2**len(enc_features)``;
  output ``(B, D, H, W, dec_features[-1])``.
  """
  enc_features: Sequence[int] = VM2_FEATURES[0]
  dec_features: Sequence[int] = VM2_FEATURES[1]
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = functools.partial(ConvBlock, dtype=self.dtype, remat=self.remat)
    levels = len(self.enc_features)
    if len(self.dec_features) < levels:
      raise ValueError(f"dec_features {tuple(self.dec_features)} needs at least "
                       f"len(enc_features)={levels} entries")
    skips = [x]
    for i, features in enumerate(self.enc_features):
      x = block(features, stride=2, name=f"enc_{i}")(x)
      skips.append(x)
    skips.pop()  # the coarsest activation feeds the decoder directly
    # Decoder: after each of the first `levels` convs, x2 upsampling and concatenation with the
    # encoder activation of that resolution; the next block takes both (ConvBlock(x, skip)).
    names = ([f"dec_{i}" for i in range(levels)]
             + [f"full_{i}" for i in range(len(self.dec_features) - levels)])
    for i, (name, features) in enumerate(zip(names, self.dec_features)):
      skip = skips.pop() if 0 < i <= levels else None
      x = block(features, name=name)(x, skip)
    if len(self.dec_features) == levels:  # no full-resolution convs: the concatenation is out
      x = jnp.concatenate([blocks.upsample2(x), skips.pop().astype(x.dtype)], axis=-1)
    return x


class VxmDense(nn.Module):
  """VoxelMorph dense registration network.

  ``apply(variables, moving, fixed) -> disp``: moving and fixed ``(B, D, H, W, C)`` (spatial
  sizes divisible by ``2**len(enc_features)``) to a displacement ``(B, D, H, W, 3)`` in voxels,
  such that ``warp(moving, disp)`` matches ``fixed``.

  Attributes:
    enc_features, dec_features: U-Net widths; defaults are VM-2 (301,411 parameters),
      ``VM1_FEATURES`` gives VM-1. See also :func:`vxm_dense`.
    int_steps: 0 predicts the displacement directly; > 0 predicts a stationary velocity that is
      integrated by scaling and squaring with this many steps (diffeomorphic VoxelMorph).
    int_downsize: with ``int_steps > 0``, integrate at ``1/int_downsize`` resolution and resize
      the result back (VoxelMorph's default 2).
    dtype: computation dtype of the U-Net's convolutions, ``float32`` or ``bfloat16`` (Flax's
      convention: parameters stay float32; the last conv, the field, its integration and
      everything downstream are float32 whatever ``dtype``).
    remat: rematerialise each conv block in the backward pass (training memory; no change in
      the result).
  """
  enc_features: Sequence[int] = VM2_FEATURES[0]
  dec_features: Sequence[int] = VM2_FEATURES[1]
  int_steps: int = 0
  int_downsize: int = 2
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def levels(self) -> int:
    return len(self.enc_features)

  def __call__(self, moving: jax.Array, fixed: jax.Array, bidir: bool = False):
    """Returns ``disp``, or ``(disp, inverse_disp)`` when ``bidir`` (see :meth:`fields`)."""
    out = self.fields(moving, fixed, bidir)
    return (out["disp"], out["inverse"]) if bidir else out["disp"]

  @nn.compact
  def fields(self, moving: jax.Array, fixed: jax.Array, bidir: bool = False) -> dict:
    """All fields of one forward pass, for losses that need more than the displacement.

    Returns a dict with ``"disp"`` ``(B, D, H, W, 3)``; ``"velocity"``, the field the network
    predicts before integration (VoxelMorph regularises this one; at ``1/int_downsize``
    resolution in diffeomorphic mode, else equal to ``disp``); with ``bidir``, ``"inverse"``:
    the integral of ``-velocity`` (diffeomorphic) or ``-disp``.
    """
    checks.check_pair(moving, fixed, levels=self.levels, check_finite=False)
    x = jnp.concatenate([moving, fixed], axis=-1).astype(self.dtype)
    x = Unet(self.enc_features, self.dec_features, self.dtype, self.remat, name="unet")(x)
    # The field in f32 whatever ``dtype`` (sub-voxel accuracy): f32 products and accumulation
    # (bf16 activations times a kernel split into two bf16 parts, blocks.conv_block_f32_out).
    flow = ConvBlock(3, activation=False, dtype=self.dtype, out_dtype=jnp.float32, name="flow",
                     kernel_init=nn.initializers.normal(1e-5))(x)
    if self.int_steps == 0:
      return self.fields_from_velocity(flow, flow.shape[1:4], bidir)
    velocity = flow
    if self.int_downsize > 1:
      velocity = transforms.resize_field(
          flow, tuple(n // self.int_downsize for n in flow.shape[1:4]))
    return self.fields_from_velocity(velocity, flow.shape[1:4], bidir)

  def fields_from_velocity(self, velocity: jax.Array, full_shape, bidir: bool = False) -> dict:
    """:meth:`fields` from the network's ``velocity`` (``(B, d, h, w, 3)``, as :meth:`fields`
    returns it) on a ``full_shape`` ``(D, H, W)`` grid; no parameters (callable unbound, e.g.
    on a velocity refined for one pair)."""
    if self.int_steps == 0:
      out = {"disp": velocity, "velocity": velocity}
      if bidir:
        out["inverse"] = -velocity
      return out

    def integrate(v):
      return transforms.resize_field(transforms.integrate_velocity(v, self.int_steps),
                                     tuple(full_shape))

    out = {"disp": integrate(velocity), "velocity": velocity}
    if bidir:
      out["inverse"] = integrate(-velocity)
    return out


def variant_features(variant: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(enc_features, dec_features)`` of a paper variant: ``"vm1"`` or ``"vm2"``."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  return VARIANTS[variant]


def vxm_dense(variant: str = "vm2", **kwargs) -> VxmDense:
  """``VxmDense`` with the paper's feature widths: ``variant`` is ``"vm1"`` or ``"vm2"``."""
  enc, dec = variant_features(variant)
  return VxmDense(enc_features=enc, dec_features=dec, **kwargs)


def model_from_config(model_cfg) -> VxmDense:
  """``VxmDense`` from ``config.model`` (``configs/default.py``): the ``variant`` preset's
  widths unless ``enc_features`` / ``dec_features`` are given."""
  enc, dec = variant_features(model_cfg.variant) if model_cfg.variant else ((), ())
  enc = tuple(model_cfg.get("enc_features") or enc)
  dec = tuple(model_cfg.get("dec_features") or dec)
  if not enc or not dec:
    raise ValueError("config.model: set variant ('vm1'/'vm2') or enc_features and dec_features")
  return VxmDense(enc_features=enc, dec_features=dec, int_steps=model_cfg.int_steps,
                  int_downsize=model_cfg.int_downsize, remat=model_cfg.get("remat", False),
                  dtype=precision.compute_dtype(model_cfg.get("dtype", "float32")))


def init_variables(model: VxmDense, rng: jax.Array, spatial_shape, channels: int = 1):
  """Initialises ``model`` for volumes of ``spatial_shape`` with ``channels`` channels each."""
  dummy = jnp.zeros((1, *spatial_shape, channels), jnp.float32)
  return _init(model, rng, dummy)


@functools.partial(jax.jit, static_argnums=(0,))
def _init(model: VxmDense, rng: jax.Array, dummy: jax.Array):
  # One compiled program per (model, shape): XLA:CPU takes ~8 s to compile the initialisers of
  # even a tiny U-Net (the truncated normals), so a second init of the same model reuses it.
  return model.init(rng, dummy, dummy)


def count_params(tree) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
