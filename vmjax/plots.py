"""Figures like the VoxelMorph paper's (matplotlib, PNG): fig. 4, an example registration;
fig. 5, per-structure Dice box plots per method."""

from __future__ import annotations

import numpy as np

from vmjax.atomic import atomic_path


def available() -> bool:
  """Whether matplotlib (an optional extra, requirements-demo.txt) is installed."""
  try:
    import matplotlib  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    return False
  return True


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _mid_slices(volume: np.ndarray):
  """Mid slices of the three planes of ``(D, H, W, ...)``."""
  d, h, w = volume.shape[:3]
  return [volume[d // 2], volume[:, h // 2], volume[:, :, w // 2]]


def _grid_image(disp2d: np.ndarray, spacing: int = 6) -> tuple:
  """Line coordinates of a regular grid deformed by an in-plane displacement ``(A, B, 2)``."""
  a, b = disp2d.shape[:2]
  ya, xb = np.meshgrid(np.arange(a), np.arange(b), indexing="ij")
  # The deformed grid shows where each fixed-grid point samples the moving image.
  return ya + disp2d[..., 0], xb + disp2d[..., 1], spacing


def registration_figure(path: str, moving, fixed, moved, disp, jac_det, title: str = "") -> None:
  """Moving, fixed, moved, displacement as RGB, warped grid, Jacobian map; 3 planes."""
  plt = _pyplot()
  planes = list(zip(*[_mid_slices(v) for v in (moving, fixed, moved, disp, jac_det)]))
  columns = ["moving", "fixed", "moved", "displacement (RGB)", "warped grid",
             "Jacobian determinant"]
  fig, axes = plt.subplots(3, len(columns), figsize=(3 * len(columns), 9))
  scale = max(float(np.abs(disp).max()), 1e-6)
  in_plane = [(1, 2), (0, 2), (0, 1)]  # displacement components lying in each plane
  for row, (m, f, mv, u, j) in enumerate(planes):
    for col, img in enumerate((m, f, mv)):
      axes[row, col].imshow(img.T, cmap="gray", origin="lower")
    axes[row, 3].imshow(np.transpose(np.clip(0.5 + 0.5 * u / scale, 0, 1), (1, 0, 2)),
                        origin="lower")
    ys, xs, step = _grid_image(u[..., list(in_plane[row])])
    ax = axes[row, 4]
    for i in range(0, ys.shape[0], step):
      ax.plot(ys[i, :], xs[i, :], "k-", lw=0.5)
    for k in range(0, ys.shape[1], step):
      ax.plot(ys[:, k], xs[:, k], "k-", lw=0.5)
    ax.set_xlim(0, ys.shape[0])
    ax.set_ylim(0, ys.shape[1])
    ax.set_aspect("equal")
    im = axes[row, 5].imshow(j.T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
    if row == 0:
      fig.colorbar(im, ax=axes[row, 5], fraction=0.046)
  for col, name in enumerate(columns):
    axes[0, col].set_title(name)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def dice_boxplot(path: str, records: list[dict], labels, structure_name,
                 per_row: int = 24) -> None:
  """Per-structure Dice (left/right merged) box plots, one colour per method, in rows of
  ``per_row`` structures."""
  plt = _pyplot()
  methods = list(dict.fromkeys(r["method"] for r in records))
  structures = list(dict.fromkeys(structure_name(l) for l in labels))
  index = {s: [i for i, l in enumerate(labels) if structure_name(l) == s] for s in structures}
  colours = plt.get_cmap("tab10")
  width = 0.8 / len(methods)
  rows = [structures[i:i + per_row] for i in range(0, len(structures), per_row)]
  fig, axes = plt.subplots(len(rows), 1, figsize=(max(8, 0.6 * min(len(structures), per_row)
                                                      * max(1, len(methods) / 2)),
                                                  4.5 * len(rows)), squeeze=False)
  for ax, names in zip(axes[:, 0], rows):
    for m, method in enumerate(methods):
      runs = [r for r in records if r["method"] == method]
      values = [np.concatenate([r["dice"][index[s]] for r in runs]) for s in names]
      values = [v[np.isfinite(v)] for v in values]
      positions = np.arange(len(names)) + (m - (len(methods) - 1) / 2) * width
      box = ax.boxplot(values, positions=positions, widths=width * 0.9, patch_artist=True,
                       showfliers=False)
      for patch in box["boxes"]:
        patch.set_facecolor(colours(m))
      ax.plot([], [], color=colours(m), lw=8, label=method)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
  axes[0, 0].legend(ncol=len(methods), loc="lower left")
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  """Writes the PNG atomically."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100)
  _pyplot().close(fig)
