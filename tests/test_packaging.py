"""What a wheel needs that an editable install hides: package data, paths under the current directory, the
runtime dependencies. The full check (build, fresh venv, validate/plan/run from elsewhere) is ``.ci/wheel_check``."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata, resources
from pathlib import Path

import pytest

from sync.cli import main
from sync.config import job_schema
from sync.demo import demo_job

REPO = Path(__file__).resolve().parent.parent
# Import name → distribution name, where they differ.
_DISTRIBUTION_OF = {
    "yaml": "pyyaml",
    "prometheus_client": "prometheus-client",
    "jsonschema_rs": "jsonschema-rs",
    "adbc_driver_manager": "adbc-driver-manager",
    "adbc_driver_postgresql": "adbc-driver-postgresql",
}
_OPTIONAL_EXTRAS = ("postgres", "duckdb")
"""Extras whose modules sync/ imports only when a job uses them (database sources, a coordination database)."""


def test_schema_is_package_data_and_the_same_file_as_the_top_level_one() -> None:
    packaged = resources.files("sync").joinpath("schemas", "job.schema.json").read_text(encoding="utf-8")
    assert packaged == (REPO / "schemas" / "job.schema.json").read_text(encoding="utf-8")
    assert job_schema()["$schema"].startswith("https://json-schema.org/")


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"pushsync {metadata.version('pushsync')}"


def test_demo_job_writes_under_the_given_directory_not_the_package(tmp_path: Path) -> None:
    job = demo_job(tmp_path / "demo-out", "http://127.0.0.1:1/rest/3.0/")
    assert job.workdir == (tmp_path / "demo-out" / ".pushsync" / "demo").resolve()
    assert all(Path(p).is_relative_to(tmp_path) for s in job.sources for p in s.paths)
    assert job.destination.base_url == "http://127.0.0.1:1/rest/3.0/"


def _third_party_imports() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "sync").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "sync"}


def _names(deps: list[str]) -> set[str]:
    return {dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for dep in deps}


def test_runtime_dependencies_are_what_the_package_imports() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = _names(project["dependencies"])
    optional = set().union(*(_names(project["optional-dependencies"][e]) for e in _OPTIONAL_EXTRAS))
    imported = {_DISTRIBUTION_OF.get(m, m).lower() for m in _third_party_imports()}
    # Every import is declared (required or in an optional extra); every required dependency is imported.
    assert imported <= declared | optional and declared <= imported
