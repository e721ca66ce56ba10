"""Every script in scripts/ says what it does in one line and runs from its `--help` (all of them in
one fresh interpreter, support.script_help: the imports are paid once)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.fit import ENV, ROOT

SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    command = [sys.executable, "-m", "support.script_help", *map(str, SCRIPTS)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_has_a_one_line_summary_and_a_help(script: Path, helps: dict[str, dict]) -> None:
    docstring = ast.get_docstring(ast.parse(script.read_text()))
    assert docstring, f"{script.name} has no docstring"
    summary, _, rest = docstring.partition("\n")
    assert summary.endswith((".", "?")) and not rest[:1].strip(), (
        f"{script.name}: {summary!r} is not one line"
    )
    done = helps[script.name]
    assert done["code"] == 0, done["stderr"][-2000:]
    assert "usage:" in done["stdout"] and " ".join(summary.split()[:4]) in " ".join(done["stdout"].split())
