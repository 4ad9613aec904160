"""Test set-up: 4 simulated CPU devices (for the pmap tests) and float32 everywhere; the tiers.

Tests marked ``slow`` (subprocess commands, multi-process runs, real-data and whole-model tests;
every test that reads ``../shared/data`` is marked by the hook below) are left out of the fast
tier a developer runs while working: ``python -m pytest tests -m "not slow"``. README's command
and CI run everything.
"""

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


def pytest_collection_modifyitems(items):
  """Real-data tests are slow: each reads and registers full-size scans."""
  for item in items:
    if "shared_data" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.slow)
