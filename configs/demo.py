"""README's main job: no download, ~2 minutes on 2 CPU cores (113 s measured).

Atlas = the MNI152 template that ships inside the nilearn wheel; training "subjects" are random
smooth deformations (and intensity changes) of it, made on the fly; validation is on held-out
synthetic pairs from a separate seed, with Dice of grey/white-matter masks before vs after.
Resolution 4 mm (48x64x48) to fit a CPU.
"""

from vmjax.configs import default
from vmjax import config_args
from vmjax import data


def get_config(arg=None):
  config = default.get_config()
  config.data.train = data.MNI152_SPEC
  config.data.atlas = data.MNI152_SPEC
  config.data.downsample = 4
  config.data.shape = (48, 64, 48)
  config.data.val_synthetic = 8
  config.augment.deform_std = 3.0
  config.augment.deform_spacing = 12.0
  config.augment.gamma_std = 0.1
  config.augment.bias_std = 0.1
  config.augment.noise_std = 0.01
  config.optimizer.learning_rate = 1e-3  # short schedule: faster than the paper's 1e-4
  config.num_steps = 250
  config.log_every = 10
  config.eval_every = 50
  config.checkpoint_every = 50
  return config_args.apply_arg(config, arg)
