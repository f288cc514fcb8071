"""The package's layering: stagediff's modules import one another without cycles, and the config
schema stays light (it imports no stage, hub, evaluation or diffusers pipeline module)."""

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = ["stagediff.modules", "stagediff.pipelines", "stagediff.benchmarks"]


def stagediff_modules() -> dict[str, str]:
    """{module name: source file} of every stagediff module, packages included."""
    found = {}
    for package_name in PACKAGES:
        if importlib.util.find_spec(package_name) is None:
            continue
        package = importlib.import_module(package_name)
        found[package_name] = package.__file__
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            found[info.name] = importlib.util.find_spec(info.name).origin
    return found


def imported_modules(name: str, path: str, known: set[str]) -> set[str]:
    """The stagediff modules that module `name` imports anywhere in its source (module level,
    inside functions, or under TYPE_CHECKING: each is a dependency of the design)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    imports = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            # `from . import config` imports a module; `from .config import X` imports from one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `a.b.c` attribute -> the module that holds it
                target = target.rpartition(".")[0]
            if target and target != name:
                imports.add(target)
    return imports


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (depth-first search), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = stagediff_modules()
    # A package's __init__ is imported before any of its modules: not an edge of the design.
    packages = {name for name, path in modules.items() if path.endswith("__init__.py")}
    return {name: imported_modules(name, path, set(modules)) - packages for name, path in modules.items()}


def test_no_import_cycle_among_stagediff_modules():
    graph = import_graph()
    assert len(graph) > 30  # every module was found
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_walk_finds_cycles_and_late_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    (tmp_path / "layered").mkdir()
    (tmp_path / "layered" / "__init__.py").write_text("")
    (tmp_path / "layered" / "low.py").write_text("def f():\n    from .high import g\n")
    (tmp_path / "layered" / "high.py").write_text("from . import low\nfrom .low import f as g\n")
    known = {"layered", "layered.low", "layered.high"}
    graph = {name: imported_modules(name, str(tmp_path / "layered" / f"{name.split('.')[-1]}.py"), known) - {"layered"}
             for name in ("layered.low", "layered.high")}
    assert graph == {"layered.low": {"layered.high"}, "layered.high": {"layered.low"}}
    assert find_cycle(graph) == ["layered.high", "layered.low", "layered.high"]


@pytest.mark.parametrize("module, forbidden", [
    ("stagediff.pipelines.config", ["stagediff.pipelines.stages", "stagediff.pipelines.registry",
                                    "stagediff.pipelines.hub", "stagediff.pipelines.evaluation",
                                    "stagediff.pipelines.trainer", "diffusers.pipelines", "diffusers.models"]),
    ("stagediff.pipelines.evaluation", ["stagediff.pipelines.stages", "stagediff.pipelines.registry"]),
    ("stagediff.pipelines.stage_folder", ["stagediff.pipelines.stages", "stagediff.pipelines.config", "diffusers"]),
])
def test_lower_layers_load_nothing_above_them(module, forbidden):
    """Measured in a fresh interpreter: what importing a module really loads."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    if module.endswith(".config"):  # the schema and the data layer it validates, nothing else of ours
        assert {m for m in loaded if m.startswith("stagediff")} == {
            "stagediff", "stagediff.pipelines", "stagediff.pipelines.config", "stagediff.pipelines.data"}
