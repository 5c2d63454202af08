"""The house: the library imports nothing of the benchmark suite, has no import circle (counting imports inside
functions), keeps files one person can read, and exports its public API from the package."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "fusion_llm"
MAX_LINES = 500


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every module this file imports (anywhere in it, including inside functions), resolved to known modules."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else {base} | submodules
    return {m for m in found if m in modules} | {m for m in found if m.split(".")[0] in ("benchmarks", "tests")}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in LIBRARY.rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def test_the_library_never_imports_the_benchmark_suite_or_the_tests():
    offenders = {m: sorted(i for i in deps if i.split(".")[0] in ("benchmarks", "tests"))
                 for m, deps in _graph().items()}
    assert {m: v for m, v in offenders.items() if v} == {}


def test_no_import_circle_in_the_library():
    graph = {m: {d for d in deps if d.startswith("fusion_llm")} for m, deps in _graph().items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_library_files_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in LIBRARY.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_public_api_from_the_package():
    import fusion_llm
    from fusion_llm import BackboneSpec, FusionConfig, FusionHead, FusionModel, get_fusion, load_backbone, train
    from fusion_llm.modeling import FusionModel as FromModule

    assert FusionModel is FromModule and issubclass(FusionConfig, object) and callable(train)
    assert callable(load_backbone) and get_fusion("concat") and BackboneSpec and FusionHead
    for name in fusion_llm.__all__:
        assert getattr(fusion_llm, name) is not None
