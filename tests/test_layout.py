"""The package's module map (docs/layout.md): stages are folders, and a folder's face loads nothing.

Written by tools/relayout.py, which moved the flat stage modules into their folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sync"
STAGES = {
    "sources": ["_column_types", "_sql_drivers", "reading", "reading_sql"],
    "planning": ["_staging", "planning", "resume", "row_keys", "validation"],
    "dispatch": ["_channel", "_dispatch_records", "_rate_meter", "_sending", "budget", "dispatch"],
    "ledger": ["exporting", "ledger", "trace"],
    "report": ["_report_data", "_report_html", "alerts", "metrics", "progress", "report", "summary"],
}
TOP_LEVEL = {
    "__init__",
    "__main__",
    "_arrow",
    "_output",
    "_prefetch",
    "_startup",
    "demo",
    "errors",
    "logs",
    "records",
    "redact",
    "run",
}


def test_only_the_orchestrator_and_shared_modules_sit_at_the_top() -> None:
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_folder_holds_its_modules(stage: str) -> None:
    assert {p.stem for p in (ROOT / stage).glob("*.py")} >= {"__init__", *STAGES[stage]}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_face_imports_nothing_when_loaded(stage: str) -> None:
    # Importing one module of a stage runs the stage's __init__: an eager face would import the whole stage
    # and turn the stages' one-way imports into cycles. Its imports are for mypy only (TYPE_CHECKING).
    tree = ast.parse((ROOT / stage / "__init__.py").read_text(encoding="utf-8"))
    eager = [
        node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sync")
    ]
    assert not eager


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_face_name_resolves(stage: str) -> None:
    import importlib

    face = importlib.import_module(f"sync.{stage}")
    assert face.__all__
    for name in face.__all__:
        assert getattr(face, name) is not None
