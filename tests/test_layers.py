"""The layers, read from the source: the library does not import training/, and no module imports itself back.

Every `import` counts, those inside functions too (an import deferred into a function is still a
dependency); relative imports are resolved against the importing module's package.
"""
import ast
import importlib.machinery
import importlib.util
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "training")
COMMAND_LINE = "engine.cli"  # the layer above the library, beside training/


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every Python module of the project's packages: dotted name -> file."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def is_module(name: str, modules) -> bool:
    """A project module, or a compiled one (engine._search), found beside the sources or where the package is
    installed; looked up without importing the package itself."""
    if name in modules:
        return True
    package, _, leaf = name.rpartition(".")
    if package not in modules or modules[package].name != "__init__.py":
        return False
    spec = importlib.util.find_spec(package)  # imports the package's parents only
    folders = [modules[package].parent, *map(Path, (spec.submodule_search_locations or []) if spec else [])]
    return any((f / (leaf + suffix)).exists() for f in folders for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def imported_names(name: str, path: Path, modules) -> set[str]:
    """Every absolute module name `name` (at `path`) imports, at any depth of its code.

    `from pkg import x` imports the module pkg.x when there is one (a submodule of a package that is
    already being imported), else pkg itself (a name defined there).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            out.update(f"{base}.{a.name}" if is_module(f"{base}.{a.name}", modules) else base for a in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules, e.g. functions, dropped)."""
    modules = project_modules()
    return {name: {t for t in imported_names(name, path, modules) if t in modules and t != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "engine.search" in graph["engine.cli"]  # `from ..search import ...` inside a command function
    assert "engine.errors" in graph["engine.store"]  # `from .errors import ...` at the top
    assert "training.run" in graph["engine.cli"]  # an absolute import inside `train`


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_library_does_not_import_training():
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.startswith("engine") and not (name == COMMAND_LINE or name.startswith(COMMAND_LINE + "."))
        for target in targets
        if target.split(".")[0] == "training"
    )
    assert not offenders, offenders


def test_no_import_cycles():
    graph = import_graph()
    assert not cycles(graph), cycles(graph)
