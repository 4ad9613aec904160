"""Package structure: no import cycles among vmjax's modules, and vmjax modules imported at the
top of each module (only optional packages may be imported lazily)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vmjax"


def vmjax_imports(tree):
  """``[(module name, node)]`` of every ``vmjax`` module a syntax tree imports."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vmjax":
      if node.module == "vmjax":
        out += [(alias.name, node) for alias in node.names]
      else:
        out.append((node.module.split(".")[1], node))
    elif isinstance(node, ast.Import):
      out += [(a.name.split(".")[1], node) for a in node.names if a.name.startswith("vmjax.")]
  return out


def module_trees():
  return {path.stem: ast.parse(path.read_text()) for path in PACKAGE.glob("*.py")}


def test_no_import_cycles():
  trees = module_trees()
  graph = {name: {m for m, _ in vmjax_imports(tree) if m in trees and m != name}
           for name, tree in trees.items()}
  graph.pop("__init__")
  for deps in graph.values():
    deps.discard("__init__")
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
  for name, tree in module_trees().items():
    top_level = {id(node) for node in tree.body}
    lazy = [f"{name}.py:{node.lineno} imports {module}" for module, node in vmjax_imports(tree)
            if id(node) not in top_level]
    assert not lazy, lazy
