"""CI smoke run: tiny volumes (32^3 MNI152 at 6 mm), a few steps, checkpoints every 3."""

from vmjax.configs import demo
from vmjax import config_args


def get_config(arg=None):
  config = demo.get_config()
  config.data.downsample = 6
  config.data.shape = (32, 32, 32)
  config.data.val_synthetic = 2
  config.augment.deform_std = 1.5
  config.augment.deform_spacing = 8.0
  config.num_steps = 6
  config.log_every = 1
  config.eval_every = 3
  config.checkpoint_every = 3
  return config_args.apply_arg(config, arg)
