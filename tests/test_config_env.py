"""``${NAME}`` interpolation in destination.base_url, workdir and source paths (docs/jobs.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync.config import load_job
from sync.errors import BadJobError

JOB = """
name: envjob
workdir: ${STATE_DIR:-state}/envjob
destination:
  platform: netmera
  base_url: ${NETMERA_URL}
  secret: {env: NETMERA_API_KEY}
sources:
  - name: users
    path: ${EXPORT_DIR}/users.csv
    ext_id: id
    attributes: {name: string}
  - name: more
    paths: ["${EXPORT_DIR}/more-*.csv", "price$$list.csv"]
    ext_id: id
    attributes: {name: string}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(BadJobError) as info:
        load_job(path)
    return {p.location: p.message for p in info.value.problems}


def test_references_are_replaced_defaults_used_and_dollar_dollar_is_a_dollar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETMERA_URL", "https://staging.example.com/rest/3.0/")
    monkeypatch.setenv("EXPORT_DIR", "/data/exports")
    monkeypatch.delenv("STATE_DIR", raising=False)
    job = load_job(_write(tmp_path, JOB))
    assert job.destination.base_url == "https://staging.example.com/rest/3.0/"
    assert job.sources[0].paths == ("/data/exports/users.csv",)
    assert job.sources[1].paths == ("/data/exports/more-*.csv", str(tmp_path / "price$list.csv"))
    assert job.workdir == tmp_path / "state" / "envjob"
    monkeypatch.setenv("STATE_DIR", "/var/lib/pushsync")
    assert load_job(_write(tmp_path, JOB)).workdir == Path("/var/lib/pushsync/envjob")


def test_an_unset_variable_without_default_is_a_problem_naming_it_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NETMERA_URL", raising=False)
    monkeypatch.delenv("EXPORT_DIR", raising=False)
    problems = _problems(_write(tmp_path, JOB))
    assert "environment variable NETMERA_URL is not set" in problems["destination.base_url"]
    assert "environment variable EXPORT_DIR is not set" in problems["sources[0].path"]
    assert "EXPORT_DIR" in problems["sources[1].paths[0]"]
    assert "workdir" not in problems  # STATE_DIR has a default


def test_an_interpolated_base_url_still_passes_the_credential_checks_and_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXPORT_DIR", "/data")
    secret_url = "https://user:s3cr3tPassw0rdValue@api.example.com/rest/3.0/"
    monkeypatch.setenv("NETMERA_URL", secret_url)
    with pytest.raises(BadJobError) as info:
        load_job(_write(tmp_path, JOB))
    problems = {p.location: p.message for p in info.value.problems}
    assert "credentials may not be written in the URL" in problems["destination.base_url"]
    assert "s3cr3tPassw0rdValue" not in str(info.value)
    # A key put into the URL's variable by mistake is not repeated by the schema's URL check either.
    monkeypatch.setenv("NETMERA_URL", "nm_live_4f9c2a7e1b3d5f8a9c0e2b4d6f8a1c3e")
    with pytest.raises(BadJobError) as info:
        load_job(_write(tmp_path, JOB))
    assert "nm_live_4f9c2a7e1b3d5f8a9c0e2b4d6f8a1c3e" not in str(info.value)
    assert (
        "the value is not shown"
        in {p.location: p.message for p in info.value.problems}["destination.base_url"]
    )
