"""The package's dependencies point downward: the method imports no training framework, the MoE layer
and the model know nothing of the method or the callback, and the library never imports the recipes."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def imports(folder: str) -> dict[str, set[str]]:
    """For each module file under src/<folder>, the top-level names of what it imports (absolute)."""
    found = {}
    for path in sorted((SRC / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(SRC))] = names
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("stgc/method", ("lightning", "stgc.callback", "stgc.report", "stgc.module", "stgc.data")),
        ("stgc/moe", ("lightning", "stgc.method", "stgc.callback", "stgc.report")),
        ("stgc/model", ("lightning", "stgc.method", "stgc.callback")),
        ("stgc/report", ("lightning", "stgc.callback")),
        ("stgc", ("stgc_experiments",)),
    ],
)
def test_no_upward_import(folder, forbidden) -> None:
    offending = {
        path: sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        for path, names in imports(folder).items()
    }
    assert not {path: names for path, names in offending.items() if names}


def test_the_module_does_not_import_the_callback() -> None:
    (names,) = [names for path, names in imports("stgc").items() if path == "stgc/module.py"]
    assert "stgc.callback" not in names and "stgc" not in names
