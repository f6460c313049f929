#!/usr/bin/env python3
"""Move sync/'s flat stage modules into stage folders and rewrite every reference to them.

Run from the repository root on a clean checkout (standard library only; ruff from .venv is used, when present,
to re-sort the rewritten imports)::

    python3 tools/relayout.py            # move, write the folders' __init__.py, rewrite, re-sort
    python3 tools/relayout.py --dry-run  # print the plan, touch nothing

What it does, in order:

1. ``git mv sync/<module>.py sync/<folder>/<module>.py`` for every module in ``LAYOUT`` (a module already in
   its folder is skipped, so a second run moves nothing).
2. Writes each folder's ``__init__.py``: the stage's docstring and its public face, the names code outside the
   folder imports from the folder's public modules, re-exported under ``__all__``.
3. Rewrites references in sync/, tests/, bench/, examples/, docs/, README.md, pyproject.toml, Makefile, .ci/:
   dotted module paths (``from sync.planning import``, ``import sync.ledger``, ``"sync.reading_sql"`` in
   monkeypatch/importlib strings, logger names) become the full new path (``sync.planning.planning``,
   ``sync.sources.reading_sql``); ``from sync import reading`` becomes ``from sync.sources import reading``;
   file paths ``sync/<module>.py`` become ``sync/<folder>/<module>.py``. The rewrite works on module paths
   (regexes), not on a list of known imports, so it also rewrites code merged after this script was written.
   A path already in its new form is left alone, so the rewrite is idempotent.
4. Runs ``ruff check --select I,RUF022 --fix`` and ``ruff format`` on the Python files it changed (new module paths
   sort differently), if ``.venv/bin/ruff`` exists.
5. Writes tests/test_layout.py, which pins the new map: the modules left at the top of sync/ are exactly
   ``TOP_LEVEL`` (a module added later must be placed), each stage folder holds its modules, each face loads
   nothing at import time and every face name resolves.
6. Prints what it moved and rewrote, and anything it could not handle (top-level modules it does not map,
   parenthesised ``from sync import (...)`` of moved modules).

Internal code always imports the full module path (``from sync.planning.planning import Plan``); the folders'
``__init__`` faces are for readers and for ``sync.run``/``sync.config``-style use, and no old flat path is kept
as an alias: pushsync has no outside users of these modules.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

# folder → (docstring of the stage, modules moved into it). Modules not named here stay at the top of sync/.
LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "sources": (
        "Where rows come from: files (CSV, Parquet) and databases (PostgreSQL, DuckDB, SQLite) → Arrow record"
        " batches,\nstreamed, only the mapped columns, with the column types checked against the mapping.",
        ("reading", "reading_sql", "_sql_drivers", "_column_types"),
    ),
    "planning": (
        "From read rows to the batches a run sends: typing, checks and duplicate resolution (validation), the"
        "\nplatform's builder (planning) and its staging area on disk, the row keys snapshot mode diffs on, and which batches a resume or"
        " retry sends.",
        ("planning", "_staging", "validation", "row_keys", "resume"),
    ),
    "dispatch": (
        "Sending a plan's batches: lanes per endpoint through a bounded channel, rate budgets and budget groups,"
        "\nretries, splitting on 400, and the achieved-rate meter.",
        ("dispatch", "_sending", "_channel", "_dispatch_records", "budget", "_rate_meter"),
    ),
    "ledger": (
        "The record of runs, batches, attempts and refused IDs (embedded SQLite), its export and its trace"
        " of one ID.",
        ("ledger", "exporting", "trace"),
    ),
    "report": (
        "What a run tells people and schedulers: the summary, the HTML report, metrics, progress and alerts.",
        ("summary", "report", "_report_data", "_report_html", "metrics", "progress", "alerts"),
    ),
}

# Modules that stay at the top of sync/ on purpose (anything else left there is reported as unmapped).
TOP_LEVEL = {"__init__", "__main__", "run", "records", "errors", "logs", "redact", "demo"}

# Where references are rewritten (relative to the repository root).
TREES = ("sync", "tests", "bench", "examples", "docs", ".ci")
FILES = ("README.md", "pyproject.toml", "Makefile")
SUFFIXES = {".py", ".md", ".toml", ".cfg", ".ini", ".txt", ".yaml", ".yml", ".json", ".sh", ""}

FOLDER_OF: dict[str, str] = {module: folder for folder, (_, modules) in LAYOUT.items() for module in modules}
MEMBERS = {folder: set(modules) for folder, (_, modules) in LAYOUT.items()}


def _dotted_pattern() -> re.Pattern[str]:
    """``sync.<old module>`` not preceded by a name or a dot and not followed by a name character; a
    module whose folder has its own name (``sync.planning``) is skipped when already followed by one of its
    folder's modules (``sync.planning.validation`` is the new form)."""
    alternatives = []
    for module in sorted(FOLDER_OF, key=len, reverse=True):
        guard = ""
        if module in LAYOUT:  # folder named like the module: sync.planning.<member> is already new
            members = "|".join(sorted(MEMBERS[module], key=len, reverse=True))
            guard = rf"(?!\.(?:{members})(?![\w]))"
        alternatives.append(rf"{re.escape(module)}(?![\w]){guard}")
    return re.compile(rf"(?<![\w.])sync\.(?P<module>{'|'.join(alternatives)})")


DOTTED = _dotted_pattern()
# sync/<old>.py as a file path (docs, comments, pyproject); sync/<folder>/<old>.py does not match.
PATH = re.compile(
    rf"(?<![\w./-])sync/(?P<module>{'|'.join(sorted(map(re.escape, FOLDER_OF), key=len, reverse=True))})\.py\b"
)
# `from sync import a, b` on one line (the parenthesised form is reported, not rewritten).
FROM_SYNC = re.compile(
    r"^(?P<indent>[ \t]*)from sync import (?P<names>[^()#\n]+?)(?P<comment>[ \t]*#.*)?$", re.M
)
FROM_SYNC_PAREN = re.compile(r"^[ \t]*from sync import \(", re.M)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def move(root: Path, dry_run: bool) -> list[tuple[str, str]]:
    """git mv each mapped module into its folder; returns (old, new) for the moves made."""
    moved = []
    for folder, (_, modules) in LAYOUT.items():
        for module in modules:
            old = root / "sync" / f"{module}.py"
            new = root / "sync" / folder / f"{module}.py"
            if not old.exists():
                if not new.exists():
                    print(f"  note: sync/{module}.py does not exist (removed upstream?); nothing to move")
                continue
            if new.exists():
                sys.exit(f"relayout: both {old} and {new} exist; resolve by hand")
            moved.append((str(old.relative_to(root)), str(new.relative_to(root))))
            if not dry_run:
                new.parent.mkdir(exist_ok=True)
                _git("mv", str(old.relative_to(root)), str(new.relative_to(root)))
    return moved


def _rewrite_from_sync(match: re.Match[str], problems: list[str], where: str) -> str:
    names = [n.strip() for n in match["names"].split(",") if n.strip()]
    bases = [n.split(" as ")[0].strip() for n in names]
    if not any(b in FOLDER_OF for b in bases):
        return match[0]
    groups: dict[str, list[str]] = {}
    for name, base in zip(names, bases, strict=True):
        groups.setdefault(f"sync.{FOLDER_OF[base]}" if base in FOLDER_OF else "sync", []).append(name)
    indent, comment = match["indent"], match["comment"] or ""
    lines = [f"{indent}from {package} import {', '.join(group)}" for package, group in groups.items()]
    lines[0] += comment
    if len(groups) > 1:
        problems.append(f"{where}: split `{match[0].strip()}` into {len(groups)} imports")
    return "\n".join(lines)


def rewrite_text(text: str, problems: list[str], where: str) -> str:
    """The text with every reference to a moved module in its new form."""
    text = DOTTED.sub(lambda m: f"sync.{FOLDER_OF[m['module']]}.{m['module']}", text)
    text = PATH.sub(lambda m: f"sync/{FOLDER_OF[m['module']]}/{m['module']}.py", text)
    if where.endswith(".py"):
        text = FROM_SYNC.sub(lambda m: _rewrite_from_sync(m, problems, where), text)
        for paren in FROM_SYNC_PAREN.finditer(text):
            line = text.count("\n", 0, paren.start()) + 1
            problems.append(f"{where}:{line}: parenthesised `from sync import (...)`: check it by hand")
    return text


def _candidates(root: Path) -> list[Path]:
    paths = [root / f for f in FILES if (root / f).is_file()]
    for tree in TREES:
        base = root / tree
        if base.is_dir():
            paths += [
                p
                for p in sorted(base.rglob("*"))
                if p.is_file()
                and not p.is_symlink()
                and p.suffix in SUFFIXES
                and "__pycache__" not in p.parts
            ]
    return paths


def rewrite(root: Path, dry_run: bool, problems: list[str]) -> list[Path]:
    changed = []
    for path in _candidates(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        where = str(path.relative_to(root))
        new = rewrite_text(text, problems, where)
        if new != text:
            changed.append(path)
            if not dry_run:
                path.write_text(new, encoding="utf-8")
    return changed


def _public_face(root: Path, folder: str) -> dict[str, list[str]]:
    """module → the public names the rest of sync/ imports from it (the folder's public face; what only the
    tests or benchmarks use stays out, to keep the face small)."""
    prefix = f"sync.{folder}."
    face: dict[str, set[str]] = {}
    for path in sorted((root / "sync").rglob("*.py")):
        if path.parent == root / "sync" / folder:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            module = node.module.removeprefix(prefix)
            if node.module.startswith(prefix) and not module.startswith("_") and "." not in module:
                face.setdefault(module, set()).update(
                    a.name for a in node.names if not a.name.startswith("_") and a.name != "*"
                )
    order = LAYOUT[folder][1]
    return {m: sorted(face[m]) for m in order if face.get(m)}


def write_inits(root: Path, dry_run: bool) -> list[str]:
    """Each folder's ``__init__.py``: its docstring and its face. The face is lazy (PEP 562 ``__getattr__``,
    with the imports under ``TYPE_CHECKING`` for mypy): importing one module of a folder must not import the
    whole folder, or the stages' one-way imports would turn into cycles through the ``__init__`` files."""
    written = []
    for folder, (doc, modules) in LAYOUT.items():
        if not (root / "sync" / folder).is_dir() and not dry_run:
            continue
        face = _public_face(root, folder) if not dry_run else {}
        lines = [f'"""{doc}', ""]
        lines.append("Modules: " + ", ".join(f"``{m}``" for m in modules) + ".")
        lines.append("")
        lines.append(
            "The names below are the stage's public face, imported on first use; code inside sync/ imports"
        )
        lines.append("the modules themselves.")
        lines.append('"""')
        lines += ["", "import importlib", "from typing import TYPE_CHECKING", ""]
        names: dict[str, str] = {}
        if face:
            lines.append("if TYPE_CHECKING:")
            for module, imported in face.items():
                lines.append(f"    from sync.{folder}.{module} import {', '.join(imported)}")
                names.update(dict.fromkeys(imported, f"sync.{folder}.{module}"))
            lines.append("")
        lines.append("_HOME = {" + ", ".join(f'"{n}": "{m}"' for n, m in sorted(names.items())) + "}")
        lines.append("")
        lines.append("__all__ = [" + ", ".join(f'"{n}"' for n in sorted(names)) + "]")
        lines += [
            "",
            "",
            "def __getattr__(name: str) -> object:",
            '    """A face name, imported from its module when first asked for."""',
            "    if name in _HOME:",
            "        return getattr(importlib.import_module(_HOME[name]), name)",
            '    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")',
        ]
        target = root / "sync" / folder / "__init__.py"
        written.append(f"{target.relative_to(root)}: {len(names)} names")
        if not dry_run:
            target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


LAYOUT_TEST = '''"""The package's module map (docs/layout.md): stages are folders, and a folder's face loads nothing.

Written by tools/relayout.py, which moved the flat stage modules into their folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sync"
STAGES = {stages}
TOP_LEVEL = {top}


def test_only_the_orchestrator_and_shared_modules_sit_at_the_top() -> None:
    assert {{p.stem for p in ROOT.glob("*.py")}} == TOP_LEVEL


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_folder_holds_its_modules(stage: str) -> None:
    assert {{p.stem for p in (ROOT / stage).glob("*.py")}} >= {{"__init__", *STAGES[stage]}}


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

    face = importlib.import_module(f"sync.{{stage}}")
    assert face.__all__
    for name in face.__all__:
        assert getattr(face, name) is not None
'''


def write_layout_test(root: Path, dry_run: bool) -> str:
    """tests/test_layout.py: pins the map this script made (top-level modules, stage folders, lazy faces)."""
    stages = {
        folder: sorted(m for m in modules if (root / "sync" / folder / f"{m}.py").exists())
        for folder, (_, modules) in LAYOUT.items()
    }
    text = LAYOUT_TEST.format(
        stages=repr(stages), top=repr(sorted(TOP_LEVEL)).replace("[", "{").replace("]", "}")
    )
    target = root / "tests" / "test_layout.py"
    if not dry_run:
        target.write_text(text, encoding="utf-8")
    return str(target.relative_to(root))


def tidy(root: Path, changed: list[Path]) -> None:
    ruff = root / ".venv" / "bin" / "ruff"
    python = [str(p.relative_to(root)) for p in changed if p.suffix == ".py"]
    python += [f"sync/{folder}/__init__.py" for folder in LAYOUT] + ["tests/test_layout.py"]
    if not ruff.exists():
        print(
            "  ruff not found in .venv: run `ruff check --select I,RUF022 --fix` and `ruff format` on sync tests bench"
        )
        _git("add", "tests/test_layout.py", *(f"sync/{folder}/__init__.py" for folder in LAYOUT))
        return
    subprocess.run([str(ruff), "check", "--quiet", "--select", "I,RUF022", "--fix", *python], check=False)
    subprocess.run([str(ruff), "format", "--quiet", *python], check=False)
    _git("add", "tests/test_layout.py", *(f"sync/{folder}/__init__.py" for folder in LAYOUT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would move, change nothing")
    args = parser.parse_args()
    root = Path(_git("rev-parse", "--show-toplevel").strip())
    problems: list[str] = []

    moved = move(root, args.dry_run)
    print(f"moved {len(moved)} modules:")
    for old, new in moved:
        print(f"  {old} → {new}")
    changed = rewrite(root, args.dry_run, problems)
    inits = write_inits(root, args.dry_run)
    layout_test = write_layout_test(root, args.dry_run)
    if not args.dry_run:
        tidy(root, changed)
        # Stage the rewrites with the moves, so `git commit` takes the relayout as one change.
        _git("add", "--", *(str(p.relative_to(root)) for p in changed if p.exists()))
        shutil.rmtree(root / "sync" / "__pycache__", ignore_errors=True)
    print(f"wrote {len(inits)} package faces:")
    for line in inits:
        print(f"  {line}")
    print(f"wrote {layout_test} (pins the new map)")
    print(f"rewrote references in {len(changed)} files:")
    for path in changed:
        print(f"  {path.relative_to(root)}")
    unmapped = sorted(
        p.stem for p in (root / "sync").glob("*.py") if p.stem not in TOP_LEVEL and p.stem not in FOLDER_OF
    )
    if unmapped:
        problems.append("top-level modules not in LAYOUT (left where they are): " + ", ".join(unmapped))
    if problems:
        print("check by hand:")
        for problem in problems:
            print(f"  {problem}")
    if not args.dry_run:
        print("next: make lint typecheck test, then git commit (everything is staged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
