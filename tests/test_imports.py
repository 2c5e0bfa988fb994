"""The project's imports read one way: every module's imports (module level or inside functions)
walked from the source, without importing anything.

  runtime <- data <- diffusion <- models <- conversion, vlm <- config_check <- runs
    <- evaluation <- training <- inference, demo, fit <- launch, benchmarks, main

A package imports only from its own layer or the layers before it; no module imports itself
back through others; benchmarks/ never imports launch/.
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("genmask_jax", "launch", "benchmarks", "configs")
# Layers, first to last; a module belongs to the layer of its longest listed prefix.
LAYERS = (
  ("genmask_jax.runtime",),
  ("genmask_jax.data",),
  ("genmask_jax.diffusion",),
  ("genmask_jax.models",),
  ("genmask_jax.conversion", "genmask_jax.vlm", "configs"),
  ("genmask_jax.config_check",),
  ("genmask_jax.runs",),
  ("genmask_jax.evaluation",),
  ("genmask_jax.training",),
  ("genmask_jax.inference", "genmask_jax.demo", "genmask_jax.fit"),
  ("launch", "benchmarks", "genmask_jax.main", "genmask_jax"),  # `genmask_jax`: the package.
)


def modules() -> dict[str, str]:
  """Module name -> source path of every module of PACKAGES."""
  found = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          found[module.removesuffix(".__init__")] = path
  return found


def imports(module: str, path: str, known: dict[str, str]) -> set[str]:
  """The project modules `module` imports (a `from package import name` of a submodule counts
  as that submodule)."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  names = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
      names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
  resolved = set()
  for name in names:
    while name and name not in known:
      name = name.rpartition(".")[0]
    if name and name != module:
      resolved.add(name)
  return resolved


def graph() -> dict[str, set[str]]:
  known = modules()
  return {module: imports(module, path, known) for module, path in known.items()}


def layer(module: str) -> int:
  matches = [
    (len(prefix), i)
    for i, prefixes in enumerate(LAYERS)
    for prefix in prefixes
    if module == prefix or module.startswith(prefix + ".")
  ]
  assert matches, f"{module} is in no layer: add its package to LAYERS"
  return max(matches)[1]


def test_no_module_imports_itself_back():
  edges = graph()
  done, path = set(), []

  def visit(module: str) -> None:
    if module in path:
      raise AssertionError("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
    if module in done:
      return
    path.append(module)
    for imported in sorted(edges[module]):
      visit(imported)
    path.pop()
    done.add(module)

  for module in sorted(edges):
    visit(module)


def test_packages_import_only_from_earlier_layers():
  upward = [
    f"{module} (layer {layer(module)}) imports {imported} (layer {layer(imported)})"
    for module, imported_modules in graph().items()
    for imported in imported_modules
    if layer(imported) > layer(module)
  ]
  assert not upward, "\n".join(upward)


def test_benchmarks_never_import_launch():
  found = [
    f"{module} imports {imported}"
    for module, imported_modules in graph().items()
    if module.startswith("benchmarks")
    for imported in imported_modules
    if imported.split(".")[0] == "launch"
  ]
  assert not found, found


def test_launch_holds_entry_points_only():
  """Every module directly under launch/ runs as `python -m launch.<name>`; what they share
  lives in launch/common/, which no entry point of it imports back."""
  folder = os.path.join(ROOT, "launch")
  scripts = [name for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py"]
  helpers = [
    name for name in scripts if '__name__ == "__main__"' not in open(f"{folder}/{name}").read()
  ]
  assert scripts and not helpers, f"launch/ modules that are not entry points: {helpers}"
  edges = graph()
  back = [
    f"{module} imports {imported}"
    for module, imported_modules in edges.items()
    if module.startswith("launch.common")
    for imported in imported_modules
    if imported.startswith("launch.") and not imported.startswith("launch.common")
  ]
  assert not back, back


def test_the_walk_sees_imports_inside_functions():
  """Lazy imports count: the package imports the façade on first use of `GenMask`, the
  in-process VLM its PyTorch encoder only when texts are encoded."""
  edges = graph()
  assert "genmask_jax.inference.genmask" in edges["genmask_jax"]
  assert "genmask_jax.vlm.encode" in edges["genmask_jax.vlm.in_process"]
  assert "genmask_jax.vlm.in_process" in edges["genmask_jax"]


def test_the_python_api_imports_no_pytorch_until_it_encodes():
  """`from genmask_jax import GenMask, VLM` (the README's API) leaves PyTorch unimported: a run
  opened with a feature store never needs it."""
  code = (
    "import sys; from genmask_jax import GenMask, VLM; VLM('qwen'); "
    "assert 'torch' not in sys.modules, 'torch imported'"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
