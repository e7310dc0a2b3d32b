"""The import graph of ``bytescale`` points one way: every import (module level or inside a function) goes to a
module of the same layer or one below it, and no chain of imports comes back to where it started.

Layers, bottom to top (docs/ARCHITECTURE.md draws the same picture):

  0  vocab, ops/*, kernels/*         pure functions on arrays, Pallas kernels
  1  configs, data/*, parallel        validated configs, data pipeline, the logical-axis table; evals' task generators
  2  nn/*, patching, entropy, flops   thin NNX layers, patchers, FLOP arithmetic
  3  models/*                         the models, their presets and FLOP counters, the registry table
  4  train/*, generate, speculative, interop, convert, rope_search, evals.scoring, evals.suites
  5  cli, commands/*                  command-line code

Edges are read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts
like any other.
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent / "bytescale"

LAYERS = (
    ("bytescale", "bytescale.vocab", "bytescale.ops", "bytescale.ops.*", "bytescale.kernels", "bytescale.kernels.*"),
    ("bytescale.configs", "bytescale.data", "bytescale.data.*", "bytescale.parallel",
     "bytescale.evals", "bytescale.evals.tasks", "bytescale.evals.noise", "bytescale.evals.chars",
     "bytescale.evals.passkey", "bytescale.evals.induction"),
    ("bytescale.nn", "bytescale.nn.*", "bytescale.patching", "bytescale.entropy", "bytescale.flops"),
    ("bytescale.models", "bytescale.models.*"),
    ("bytescale.train", "bytescale.train.*", "bytescale.generate", "bytescale.speculative", "bytescale.interop",
     "bytescale.convert",
     "bytescale.rope_search", "bytescale.evals.scoring", "bytescale.evals.suites"),
    ("bytescale.cli", "bytescale.commands", "bytescale.commands.*"),
)


def module_files(root: pathlib.Path = PACKAGE_ROOT) -> dict[str, pathlib.Path]:
  """``{dotted module name: path}`` of every module of the package (``__init__`` files name their package)."""
  modules = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules ``name`` imports anywhere in its source. ``from a.b import c`` is an edge to ``a.b.c``
  when that is a module, else to ``a.b``; relative imports are resolved against ``name``'s package."""
  tree = ast.parse(path.read_text(), filename=str(path))
  is_package = path.name == "__init__.py"
  edges = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:  # `import bytescale.ops.rope.x` -> the longest known prefix
        target = target.rpartition(".")[0]
      if target and target != name:
        edges.add(target)
  return edges


def import_graph() -> dict[str, set[str]]:
  files = module_files()
  known = set(files)
  return {name: imported_modules(name, path, known) for name, path in files.items()}


def layer_of(module: str) -> int:
  for index, patterns in enumerate(LAYERS):
    if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
      return index
  raise LookupError(module)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_every_module_has_a_layer(graph):
  unplaced = []
  for module in graph:
    try:
      layer_of(module)
    except LookupError:
      unplaced.append(module)
  assert not unplaced, f"add these modules to a layer in tests/test_layering.py LAYERS: {unplaced}"


def test_no_import_points_up(graph):
  upward = [f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
            for source, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(source)]
  assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


# --- The checker itself must be able to fail ---------------------------------------------------------------

def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for relative, text in files.items():
    path = root / "bytescale" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root / "bytescale"


def test_checker_sees_lazy_relative_and_from_imports(tmp_path):
  root = _write(tmp_path, {
      "__init__.py": "",
      "vocab.py": "def f():\n  from bytescale.models import bytelm  # lazy, upward\n",
      "models/__init__.py": "from .bytelm import X\n",
      "models/bytelm.py": "import bytescale.vocab\nfrom bytescale import configs\nX = 1\n",
      "configs.py": "",
  })
  files = module_files(root)
  edges = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
  assert edges["bytescale.vocab"] == {"bytescale.models.bytelm"}
  assert edges["bytescale.models"] == {"bytescale.models.bytelm"}
  assert edges["bytescale.models.bytelm"] == {"bytescale.vocab", "bytescale.configs"}
  assert layer_of("bytescale.models.bytelm") > layer_of("bytescale.vocab")  # so the lazy import above is upward
  assert find_cycle(edges) == ["bytescale.models.bytelm", "bytescale.vocab", "bytescale.models.bytelm"]


def test_find_cycle_on_a_dag_and_a_loop():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
