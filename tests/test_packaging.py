"""The dependency pins of pyproject.toml and environment.yml agree."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def _environment_pins() -> set[str]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    return {line for line in pip_section if not line.startswith("-e")}


def test_every_dependency_is_pinned_exactly() -> None:
    assert all("==" in pin for pin in _pyproject_pins()), _pyproject_pins()


def test_environment_yml_mirrors_pyproject() -> None:
    assert _environment_pins() == _pyproject_pins()


def test_environment_yml_uses_python_311() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in environment["dependencies"]
