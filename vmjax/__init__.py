"""vmjax: learned deformable 3-D image registration (VoxelMorph) in JAX/Flax.

Conventions: volumes ``(B, D, H, W, C)``, displacements ``(B, D, H, W, 3)`` in voxels along
(D, H, W); ``moved(x) = moving(x + disp(x))``.
"""

from vmjax.checks import check_pair, check_volume
from vmjax.losses import grad_loss, mse_loss, ncc_loss, soft_dice_loss
from vmjax.metrics import dice, folding_fraction, jacobian_determinant
from vmjax.networks import (VM1_FEATURES, VM2_FEATURES, Unet, VxmDense, count_params,
                            init_variables, vxm_dense)
from vmjax.registration import pad_to_multiple, register
from vmjax.transforms import compose, identity_grid, integrate_velocity, resize_field, warp

__version__ = "0.1.0"

__all__ = [
    "VM1_FEATURES", "VM2_FEATURES", "Unet", "VxmDense", "check_pair", "check_volume", "compose",
    "count_params", "dice", "folding_fraction", "grad_loss", "identity_grid", "init_variables",
    "integrate_velocity", "jacobian_determinant", "mse_loss", "ncc_loss", "pad_to_multiple",
    "register", "resize_field", "soft_dice_loss", "vxm_dense", "warp",
]
