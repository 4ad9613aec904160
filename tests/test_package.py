"""Package structure: no import cycles among vmjax's modules, and vmjax modules imported at the
top of each module (only optional packages may be imported lazily)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vmjax"


def vmjax_imports(tree, modules):
  """``[(module name, node)]`` of every vmjax module (a name of ``modules``: ``"io"``,
  ``"native.build"``) a syntax tree imports."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vmjax":
      inner = node.module[len("vmjax."):]  # "" for `from vmjax import io`
      for alias in node.names:  # a module (`from vmjax.native import build`) or a name in one
        full = f"{inner}.{alias.name}".lstrip(".")
        out.append((full if full in modules else inner, node))
    elif isinstance(node, ast.Import):
      out += [(a.name[len("vmjax."):], node) for a in node.names if a.name.startswith("vmjax.")]
  return out


def module_trees():
  """Every module of the package and its subpackages, by dotted name below ``vmjax``."""
  trees = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    trees[name] = ast.parse(path.read_text())
  return trees


def test_no_import_cycles():
  trees = module_trees()
  graph = {name: {m for m, _ in vmjax_imports(tree, trees) if m in trees and m != name}
           for name, tree in trees.items() if not name.endswith("__init__")}
  for deps in graph.values():
    deps -= {n for n in deps if n.endswith("__init__")}
  # The graph sees through subpackages (conv uses the native build) and names in modules.
  assert "native.build" in graph["conv"] and "io" in graph["ants_io"]
  done, path = set(), []

  def visit(name):
    if name in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
    if name in done:
      return
    path.append(name)
    for dep in sorted(graph[name]):
      visit(dep)
    path.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)


def test_vmjax_modules_are_imported_at_module_level():
  trees = module_trees()
  for name, tree in trees.items():
    top_level = {id(node) for node in tree.body}
    lazy = [f"{name}.py:{node.lineno} imports {module}"
            for module, node in vmjax_imports(tree, trees) if id(node) not in top_level]
    assert not lazy, lazy


def test_the_register_command_does_not_import_orbax():
  # orbax (0.13 s of start-up) is imported where a checkpoint is read or written: the shipped
  # model's registration, the common command, reads none. A fresh interpreter: others' imports
  # in this test process do not count.
  import subprocess
  import sys
  probe = "import sys, experiments.register; print(sorted(m for m in sys.modules if " \
          "m.startswith('orbax')))"
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                       cwd=PACKAGE.parent)
  assert out.stdout.strip() == "[]", out.stdout
