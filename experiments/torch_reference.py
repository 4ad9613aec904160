"""PyTorch models for the speed comparison in ``experiments/benchmark.py --compare=torch``.

``TorchVxm`` has vmjax's architecture layer for layer (``vmjax.networks.Unet`` + flow conv; the
same parameter count) and its training step computes the same loss (windowed NCC with box sums
+ lambda * L2 gradient loss, trilinear warp); it runs channels-last (``channels_last_3d``), the
fast oneDNN layout. ``official_vxm`` is the ``voxelmorph`` package's default ``VxmPairwise``.
Optional extra: ``pip install -r requirements-bench.txt``; nothing here is imported by vmjax.
"""

import torch
from torch import nn
import torch.nn.functional as F

from vmjax.networks import VM2_FEATURES


class TorchVxm(nn.Module):
  """vmjax's VxmDense (non-diffeomorphic) in PyTorch, NCDHW tensors."""

  def __init__(self, features=VM2_FEATURES, in_channels=2):
    super().__init__()
    enc, dec = features
    self.levels = len(enc)
    self.enc = nn.ModuleList()
    channels, skip_channels = in_channels, [in_channels]
    for f in enc:
      self.enc.append(nn.Conv3d(channels, f, 3, stride=2, padding=1))
      channels = f
      skip_channels.append(f)
    skip_channels.pop()
    self.dec = nn.ModuleList()
    for f in dec[:self.levels]:
      self.dec.append(nn.Conv3d(channels, f, 3, padding=1))
      channels = f + skip_channels.pop()
    self.full = nn.ModuleList()
    for f in dec[self.levels:]:
      self.full.append(nn.Conv3d(channels, f, 3, padding=1))
      channels = f
    self.flow = nn.Conv3d(channels, 3, 3, padding=1)
    nn.init.normal_(self.flow.weight, 0.0, 1e-5)
    nn.init.zeros_(self.flow.bias)

  def forward(self, moving, fixed):
    x = torch.cat([moving, fixed], dim=1)
    skips = [x]
    for conv in self.enc:
      x = F.leaky_relu(conv(x), 0.2)
      skips.append(x)
    skips.pop()
    for conv in self.dec:
      x = F.leaky_relu(conv(x), 0.2)
      x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips.pop()], dim=1)
    for conv in self.full:
      x = F.leaky_relu(conv(x), 0.2)
    return self.flow(x)


def warp(image, disp):
  """Trilinear warp of ``image`` (B, C, D, H, W) by a voxel displacement (B, 3, D, H, W)."""
  shape = disp.shape[2:]
  grid = torch.stack(torch.meshgrid(
      *[torch.arange(n, dtype=disp.dtype, device=disp.device) for n in shape], indexing="ij"))
  loc = grid[None] + disp
  # grid_sample wants (x, y, z) = (W, H, D) order, normalised to [-1, 1].
  loc = torch.stack([2 * loc[:, i] / (shape[i] - 1) - 1 for i in (2, 1, 0)], dim=-1)
  return F.grid_sample(image, loc, mode="bilinear", padding_mode="zeros", align_corners=True)


def ncc_loss(fixed, moved, window=9):
  """Same definition as ``vmjax.losses.ncc_loss`` (box sums via a ones-kernel conv, as VoxelMorph)."""
  c = fixed.shape[1]
  stacked = torch.cat([fixed, moved, fixed * fixed, moved * moved, fixed * moved], dim=1)
  ones = torch.ones(5 * c, 1, window, window, window, dtype=fixed.dtype, device=fixed.device)
  sums = F.conv3d(stacked, ones, padding=window // 2, groups=5 * c)
  sf, sm, sff, smm, sfm = torch.split(sums, c, dim=1)
  n = float(window ** 3)
  cross = sfm - sf * sm / n
  var_f = torch.clamp(sff - sf * sf / n, min=0)
  var_m = torch.clamp(smm - sm * sm / n, min=0)
  return -torch.mean(cross * cross / (var_f * var_m + 1e-5))


def grad_loss(disp):
  """Mean squared forward differences, averaged over the 3 axes (as ``vmjax.losses.grad_loss``)."""
  total = 0.0
  for axis in (2, 3, 4):
    total = total + torch.mean(torch.diff(disp, dim=axis) ** 2)
  return total / 3.0


def train_step_fn(model, lam=1.0, lr=1e-4):
  """A closure running one Adam step of NCC + lam * grad on (moving, fixed)."""
  optimizer = torch.optim.Adam(model.parameters(), lr=lr)

  def step(moving, fixed):
    optimizer.zero_grad(set_to_none=True)
    disp = model(moving, fixed)
    if isinstance(disp, (tuple, list)):
      disp = disp[0]
    loss = ncc_loss(fixed, warp(moving, disp)) + lam * grad_loss(disp)
    loss.backward()
    optimizer.step()
    return loss
  return step


OFFICIAL_MULTIPLE = 32  # its default U-Net halves the volume 5 times


def official_vxm():
  """The ``voxelmorph`` package's default pairwise model (its own U-Net, 5-step integration);
  spatial sizes must be multiples of ``OFFICIAL_MULTIPLE``."""
  import voxelmorph as vxm  # pylint: disable=g-import-not-at-top
  return vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1)


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())
