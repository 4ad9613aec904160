"""Packaging: pyproject.toml's dependencies agree with the pins of requirements.txt."""

import pathlib

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]


def requirements(lines):
  return [Requirement(line.split("#")[0].strip()) for line in lines
          if line.split("#")[0].strip()]


def test_pyproject_dependencies_admit_every_pinned_requirement():
  tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  runtime = {r.name.lower(): r for r in requirements(project["dependencies"])}
  test_extra = {r.name.lower(): r for r in requirements(project["optional-dependencies"]["test"])}
  pinned = requirements((REPO / "requirements.txt").read_text().splitlines())
  assert pinned
  for pin in pinned:
    version = next(iter(pin.specifier)).version
    name = pin.name.lower()
    declared = runtime.get(name) or test_extra.get(name)
    assert declared is not None, f"{pin.name} is pinned in requirements.txt but not in pyproject"
    assert declared.specifier.contains(version), f"pyproject's {declared} excludes {pin}"
    assert (name in test_extra) == (name == "pytest"), f"{pin.name}: runtime or test extra?"
    assert str(declared.marker) == str(pin.marker), f"{pin.name}: platform markers differ"
  names = {p.name.lower() for p in pinned}
  assert set(runtime) <= names, f"pyproject dependencies not pinned: {set(runtime) - names}"
