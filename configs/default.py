"""Paper VoxelMorph-2, atlas-based, NCC loss (Balakrishnan et al., TMI 2019).

Point ``data.train`` / ``data.atlas`` / ``data.val`` at your scans (see README), e.g.
``--config=configs/default.py:lam=1.0 --config.data.train='scans/*.nii.gz'``.

lambda (``loss.lam``) = 1.0: the paper's best value for NCC (its fig. 6 shows Dice flat over
roughly 0.5-2 for CC, and lambda = 0.01 for MSE on [0, 1] intensities); larger values give
smoother fields with fewer folds at a small cost in Dice.
"""

import ml_collections

from vmjax import config_args


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.variant = "vm2"        # "vm1" / "vm2" presets
  config.model.enc_features = ()      # set both to override the preset
  config.model.dec_features = ()
  config.model.int_steps = 0          # > 0: diffeomorphic (scaling and squaring steps)
  config.model.int_downsize = 2       # integrate at 1/int_downsize resolution
  config.model.remat = False          # recompute conv blocks in the backward pass (less memory)
  config.model.dtype = "float32"      # convolutions' dtype: "bfloat16" halves their cost on
                                      # AMX / AVX512-BF16 CPUs and GPUs; parameters, field,
                                      # integration, warp and loss stay float32

  config.loss = ml_collections.ConfigDict()
  config.loss.image = "ncc"           # "ncc" or "mse"
  config.loss.window = 9              # NCC window
  config.loss.lam = 1.0               # smoothness weight (0.01 for mse)
  config.loss.bidir = False           # symmetric image term (VoxelMorph journal)
  config.loss.seg_weight = 0.0        # auxiliary Dice loss on warped labels (needs labels)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.grad_clip = 0.0    # global-norm clipping; 0 = off

  config.data = ml_collections.ConfigDict()
  config.data.mode = "atlas"          # "atlas": subject -> atlas; "pairs": subject -> subject
  config.data.train = ""              # glob, directory, .txt list; several: comma-separated
  config.data.atlas = ""              # the fixed image in atlas mode
  config.data.val = ""                # validation subjects (Dice against the atlas / each other)
  config.data.val_synthetic = 0       # + this many augmented copies of the atlas as val pairs
  config.data.val_seed = 12345        # their seed (separate from training's)
  config.data.seg_replace = ("t1", "labels")  # NIfTI labels: image file name with this swap
  config.data.labels = ""             # evaluation labels: list, "2,3,4", or a .txt; "" = all
  config.data.normalize = "percentile"  # "percentile" / "foreground" / "minmax" / "none"
  config.data.downsample = 1          # integer downsampling factor
  config.data.shape = ()              # centre crop/pad to this (D, H, W) after downsampling

  config.augment = ml_collections.ConfigDict()
  config.augment.deform_std = 0.0     # random smooth deformation: velocity std in voxels
  config.augment.deform_spacing = 16.0  # its control-point spacing in voxels
  config.augment.gamma_std = 0.0      # log-gamma std
  config.augment.bias_std = 0.0       # log bias-field std
  config.augment.noise_std = 0.0      # additive Gaussian noise std
  config.augment.fixed = False        # also augment the fixed image (pairs mode)

  config.per_device_batch_size = 1
  config.num_steps = 150_000
  config.log_every = 100
  config.eval_every = 2_000
  config.checkpoint_every = 2_000
  config.keep_checkpoints = 3
  config.nonfinite_patience = 10      # stop after this many non-finite steps in a row (skipped)
  config.distributed = False          # jax.distributed.initialize() (multi-host)
  return config_args.apply_arg(config, arg)
