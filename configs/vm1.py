"""VoxelMorph-1: as default (VM-2) but decoder [32, 32, 32, 32, 8, 8]."""

from vmjax.configs import default
from vmjax import config_args


def get_config(arg=None):
  config = default.get_config()
  config.model.variant = "vm1"
  return config_args.apply_arg(config, arg)
