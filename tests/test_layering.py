"""The layering: no import cycle between sftmix's modules (function-level imports included), and nothing imports the
CLI. Read from the source, so a cycle hidden in a function body (it only fails when that path runs) is caught."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sftmix"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                targets |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        # a submodule importing its own package's __init__ (`from . import x`) is no cycle
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_cycle_and_nothing_imports_the_cli():
    graph = import_graph()
    assert {"sftmix.losses", "sftmix.data.tokenization", "sftmix.recipes.run", "sftmix.cli"} <= graph.keys()

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = [name for name in graph if reaches(name, name)]
    assert not cycles, f"modules in an import cycle: {cycles}"
    assert not [name for name, targets in graph.items() if "sftmix.cli" in targets]


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "sftmix.recipes.run" in graph["sftmix.cli"]  # the CLI imports each recipe inside its command function
