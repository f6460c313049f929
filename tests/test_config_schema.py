"""The job schema's two validators: jsonschema-rs recognises a valid job (no jsonschema import at start-up), and
jsonschema, the reference, finds and words every problem. What one accepts the other must accept too."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import load_job
from sync.config._load import _NOT_SPACE_TO_RUST, _fast_validator, _schema_errors, job_schema
from sync.errors import BadJobError

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = jsonschema.Draft202012Validator(job_schema())

BASE: dict[str, Any] = {
    "name": "mini",
    "destination": {
        "platform": "netmera",
        "base_url": "http://127.0.0.1:8080/rest/3.0",
        "secret": {"env": "NETMERA_API_KEY"},
    },
    "sources": [{"name": "users", "path": "users.csv", "ext_id": "id", "attributes": {"name": "string"}}],
    "dispatch": {"budgets": {"*": {"requests": 20, "per": "1s"}}},
}


def _with(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(BASE))
    at: Any = document
    for part in path[:-1]:
        at = at[part]
    at[path[-1]] = value
    return document


def _messages(document: Any) -> list[tuple[list[Any], str]]:
    return [(list(e.absolute_path), e.message) for e in _schema_errors(document)]


def _reference(document: Any) -> list[tuple[list[Any], str]]:
    errors = sorted(REFERENCE.iter_errors(document), key=lambda e: [str(x) for x in e.absolute_path])
    return [(list(e.absolute_path), e.message) for e in errors]


def test_the_fast_validator_is_installed() -> None:
    # A declared dependency (pyproject.toml): without it every job would import jsonschema again.
    assert _fast_validator() is not None
    assert _fast_validator().is_valid(BASE)


@pytest.mark.parametrize(
    "job", sorted([*ROOT.joinpath("jobs").glob("*.yaml"), *ROOT.joinpath("tests", "fixtures").glob("*.yaml")])
)
def test_the_repository_jobs_are_judged_alike(job: Path) -> None:
    document = yaml.safe_load(job.read_text(encoding="utf-8"))
    assert _messages(document) == _reference(document)


@pytest.mark.parametrize("char", sorted(_NOT_SPACE_TO_RUST))
def test_a_base_url_with_a_space_python_reads_differently_is_still_refused(tmp_path: Path, char: str) -> None:
    # jsonschema-rs's \s is ECMA-262's: it would let these pass `[^\s]+`; jsonschema (Python's re) refuses them.
    document = _with(("destination", "base_url"), f"http://127.0.0.1:8080/a{char}b")
    assert not REFERENCE.is_valid(document)
    assert _fast_validator().is_valid(document)  # the difference the guard exists for
    assert _messages(document) == _reference(document) != []
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert "destination.base_url" in {p.location for p in info.value.problems}


def test_values_json_has_no_type_for_are_judged_by_jsonschema() -> None:
    # A tuple is an array to jsonschema-rs but not to jsonschema; a date cannot be converted at all.
    import datetime

    listed = _with(("sources",), tuple(BASE["sources"]))
    assert _fast_validator().is_valid(listed)
    assert _messages(listed) == _reference(listed) != []
    dated = _with(("name",), datetime.date(2026, 1, 1))
    assert _messages(dated) == _reference(dated) != []
    assert _messages(_with(("dispatch", "budgets", "*", "requests"), 2**70)) == _reference(
        _with(("dispatch", "budgets", "*", "requests"), 2**70)
    )
    assert _messages(_with(("dispatch", "budgets", "*", "requests"), float("nan"))) == _reference(
        _with(("dispatch", "budgets", "*", "requests"), float("nan"))
    )


def test_a_valid_job_with_a_final_newline_python_accepts_stays_valid() -> None:
    # Python's `$` matches before a final newline, ECMA-262's does not: jsonschema-rs says invalid, jsonschema
    # (the reference) decides, as before.
    document = _with(("name",), "mini\n")
    assert not _fast_validator().is_valid(document)
    assert _messages(document) == _reference(document) == []


_TRICKY = "".join(sorted(_NOT_SPACE_TO_RUST)) + " \t\n\r\x0b\x0c\xa0\ufeff\u2028\u3000é.-_:/0123456789msh"
_PATTERNED: list[tuple[str | int, ...]] = [
    ("name",),
    ("destination", "base_url"),
    ("destination", "secret", "env"),
    ("sources", 0, "name"),
    ("dispatch", "budgets", "*", "per"),
]


@settings(max_examples=300, deadline=None)
@given(
    where=st.sampled_from(_PATTERNED),
    text=st.text(alphabet=st.sampled_from(string.ascii_letters + _TRICKY), max_size=12),
    prefix=st.sampled_from(["", "http://", "1", "a"]),
)
def test_whatever_the_fast_validator_accepts_jsonschema_accepts(
    where: tuple[str | int, ...], text: str, prefix: str
) -> None:
    document = _with(where, prefix + text)
    assert _messages(document) == _reference(document)


def test_the_schema_describes_the_default_workdir_where_the_loader_puts_it(tmp_path: Path) -> None:
    """An editor shows the schema's descriptions: the workdir's said "under the current directory" while a job's
    default workdir is beside the job file (a cron job started elsewhere finds its ledger again)."""
    job = tmp_path / "jobs" / "nightly.yaml"
    job.parent.mkdir()
    job.write_text(
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:8080/', secret: {env: K}}\n"
        "sources: [{name: u, path: u.csv, ext_id: id, attributes: {a: string}}]\n",
        encoding="utf-8",
    )
    assert load_job(job).workdir == job.parent / ".pushsync" / "nightly"
    described = job_schema()["properties"]["workdir"]["description"]
    assert "beside the job file" in described and "current directory" not in described
