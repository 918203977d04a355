"""The package's layers (README, "Architecture"): a module imports only its own layer and those below it, and no
module imports another module's private name. Checked on the source, function-level imports included."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ssamba"

# lower layers never import higher ones (README "Architecture")
LAYERS = {"audio": 0, "features": 0, "fields": 0, "ops": 1, "nn": 2, "models": 3, "data": 4, "pretrain": 4,
          "train": 5, "tasks": 6, "analysis": 6, "bench": 6, "convert": 6, "hear": 6, "demo": 7, "cli": 8}
# the known exceptions, each with what ends it (none left since issue 16)
KNOWN: dict = {}


def _imports():
    """(importing module, imported module, imported names) for every ``ssamba`` import in the package."""
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssamba"):
                yield module, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("ssamba"):
                        yield module, alias.name, []


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in SRC.iterdir()} - {"__init__", "__main__", "__pycache__"}
    assert tops == set(LAYERS), "a new top-level module needs its place in LAYERS and in the README"


def test_no_layer_imports_a_higher_one():
    upward = set()
    for module, imported, _ in _imports():
        mine, theirs = _layer(module), _layer(imported)
        if mine is not None and theirs is not None and theirs > mine:
            upward.add((module, imported))
    assert upward == set(KNOWN), sorted(upward - set(KNOWN)) or f"fixed, drop from KNOWN: {set(KNOWN) - upward}"


def test_no_module_imports_another_modules_private_name():
    private = {(module, imported, name) for module, imported, names in _imports() for name in names
               if name.startswith("_") and imported != module}  # fmt: skip
    assert not private, sorted(private)


def test_no_import_cycle():
    """No module imports one that imports it back, directly or through others (function-level imports too;
    packages' ``__init__`` re-exports are left out: importing a submodule runs its package first by design)."""
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, imported, names in _imports():
        targets = {f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules} or {imported}
        graph.setdefault(module, set()).update(t for t in targets if t in modules and t != module)
    packages = {m for m in modules if m.endswith("__init__")} | {m.rsplit(".", 1)[0] for m in modules}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done or module in packages:
            return
        for nxt in sorted(graph.get(module, ())):
            visit(nxt, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
