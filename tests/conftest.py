"""Test set-up: 4 simulated CPU devices (for the pmap tests) and float32 everywhere."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import pytest  # noqa: E402

# The repository root (for `configs` and `experiments`), wherever pytest is started from.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data` beside the checkout; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (only CI and developers have ../shared)")
  return SHARED_DATA
