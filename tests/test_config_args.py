"""Config arguments as users type them: ``--config=configs/x.py:key=value,...``."""

import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from vmjax.configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_config_string_argument():
  config = default.get_config("variant=vm1,lam=0.5,lr=3e-4,shape=64x80x64,loss.window=7")
  assert config.model.variant == "vm1" and config.loss.lam == 0.5
  assert config.optimizer.learning_rate == 3e-4 and config.loss.window == 7
  assert tuple(config.data.shape) == (64, 80, 64)
  with pytest.raises(ValueError, match="no field"):
    default.get_config("lamda=1")
  with pytest.raises(ValueError, match="key=value"):
    default.get_config("vm1")


def parse_command_line(*args):
  """``args`` parsed as a training command line would be, in a fresh flag set."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True)
  values(["prog", *args])
  return values.config


def test_lists_tuples_and_scientific_notation_from_the_command_line():
  config = parse_command_line(
      f"--config={REPO / 'configs' / 'default.py'}:data.train=a.nii.gz,b.nii.gz,"
      "data.seg_replace=(t1,seg),steps=1e4,lr=3e-4,data.labels=2,3,4,bidir=true")
  assert config.data.train == "a.nii.gz,b.nii.gz"
  assert tuple(config.data.seg_replace) == ("t1", "seg")
  assert config.num_steps == 10_000 and isinstance(config.num_steps, int)
  assert config.optimizer.learning_rate == 3e-4 and config.loss.bidir is True
  assert config.data.labels == "2,3,4"


@pytest.mark.parametrize("arg,expected", [
    ("shape=[64,80,64]", (64, 80, 64)),
    ("shape=(64, 80, 64)", (64, 80, 64)),
    ("shape=64x80x64", (64, 80, 64)),
    ("data.seg_replace=[t1, 'labels']", ("t1", "labels")),
])
def test_tuple_spellings(arg, expected):
  config = default.get_config(arg)
  field = config.data.shape if arg.startswith("shape") else config.data.seg_replace
  assert tuple(field) == expected


@pytest.mark.parametrize("arg,message", [
    ("steps=abc", r"steps=abc: num_steps expects an integer"),
    ("steps=1.5", r"num_steps expects an integer"),
    ("lr=fast", r"optimizer.learning_rate expects a number"),
    ("bidir=maybe", r"loss.bidir expects a boolean"),
    ("data.nope=2", r"'data.nope': the config has no field data.nope"),
    ("optimizer.learning_rate.x=1", r"no field optimizer.learning_rate.x"),
])
def test_unknown_key_or_wrong_type_is_one_error_naming_the_key(arg, message):
  with pytest.raises(ValueError, match=message):
    default.get_config(arg)


def test_a_config_path_outside_a_checkout_is_the_shipped_config(tmp_path, monkeypatch):
  from vmjax import configs  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # no configs/ here, as after `pip install vmjax`
  shipped = pathlib.Path(configs.DIR)
  assert {"default", "demo", "smoke"} <= set(configs.shipped())
  argv = configs.resolve_argv(["vmjax-train", "--config=configs/smoke.py:steps=3",
                               "--workdir=w", "--config.seed=2"])
  assert argv == ["vmjax-train", f"--config={shipped / 'smoke.py'}:steps=3", "--workdir=w",
                  "--config.seed=2"]
  assert configs.resolve_argv(["p", "--config", "demo"]) == ["p", "--config",
                                                            str(shipped / "demo.py")]
  config = parse_command_line(argv[1])  # loads, and its `from vmjax.configs import ...` works
  assert config.num_steps == 3
  # A file of that path here wins; an unknown name stays as typed (the flag then says so).
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "smoke.py").write_text("")
  assert configs.resolve("configs/smoke.py") == "configs/smoke.py"
  assert configs.resolve("configs/nope.py") == "configs/nope.py"
  assert configs.resolve("myconfigs/demo.py") == "myconfigs/demo.py"  # not a shipped one's path
