"""Job files: loading, platform defaults, path resolution and reporting every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync.config import (
    AttributeMode,
    FileFormat,
    Job,
    NullAction,
    RateBudgetSpec,
    SourceKind,
    TagAction,
    ValueType,
    load_job,
)
from sync.errors import BadJobError, ExitCode

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

MINIMAL = """
name: mini
destination:
  platform: netmera
  base_url: http://127.0.0.1:8080/rest/3.0
  secret: {env: NETMERA_API_KEY}
sources:
  - name: users
    path: data/users.csv
    ext_id: id
    attributes: {name: string}
"""


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(BadJobError) as info:
        load_job(path)
    assert info.value.exit_code is ExitCode.BAD_JOB_OR_INPUT
    return {p.location: p.message for p in info.value.problems}


def test_example_job_loads() -> None:
    job = load_job(ROOT / "jobs" / "example.yaml")
    assert isinstance(job, Job)
    assert job.name == "example"
    assert job.path == (ROOT / "jobs" / "example.yaml").resolve()
    assert job.destination.platform == "netmera"
    assert job.destination.base_url == "http://127.0.0.1:8080/rest/3.0/"
    assert job.destination.secret_env == "NETMERA_API_KEY"
    assert [s.kind for s in job.sources] == [
        SourceKind.USERS,
        SourceKind.TAGS,
        SourceKind.EVENTS,
        SourceKind.DELETIONS,
    ]
    users = job.sources[0]
    assert users.paths == (str(ROOT / "jobs" / "data" / "users.csv"),)
    assert users.format is FileFormat.CSV
    assert users.ext_id == "customer_id"  # from defaults
    assert {a.column: a.type for a in users.attributes}["birth_date"] is ValueType.DATE
    interests = next(a for a in users.attributes if a.column == "interests")
    assert (interests.mode, interests.attribute) == (AttributeMode.PUSH, "lastVisitedCategories")
    assert next(a for a in users.attributes if a.column == "city").on_null is NullAction.UNSET
    assert users.tags[0].action is TagAction.TAG
    assert users.opt_ins.categories == {"Promotions": "promo_opt_in", "News": "news_opt_in"}
    assert "crm_note" not in users.columns()  # extra columns are not read
    assert job.dispatch.budgets["enablePush"] == RateBudgetSpec(50, 1.0)
    assert job.batch_size_for("tagUsers") == 1000


def test_platform_defaults_workdir_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "jobs"
    sub.mkdir()
    job = load_job(_write(sub, MINIMAL))
    assert job.workdir == sub / ".pushsync" / "mini"  # beside the job file, whatever the current directory
    assert job.sources[0].paths == (str(sub / "data" / "users.csv"),)
    assert job.dispatch.budget_for("tagUsers") == RateBudgetSpec(20, 1.0)  # Netmera default
    assert job.batch_size_for("setProfileAttributes") == 1000
    assert job.destination.base_url.endswith("/")

    custom = load_job(
        _write(
            sub,
            MINIMAL + "workdir: state\ndispatch:\n  batch_size: {'*': 500, tagUsers: 100}\n"
            "  budgets: {tagUsers: {requests: 30, per: 1m}, enablePush: {requests: 5, period: 2}}\n",
            "custom.yaml",
        )
    )
    assert custom.workdir == sub / "state"
    assert custom.batch_size_for("tagUsers") == 100
    assert custom.batch_size_for("enableMail") == 500
    assert custom.dispatch.budgets["tagUsers"] == RateBudgetSpec(30, 60.0)
    assert custom.dispatch.budgets["enablePush"] == RateBudgetSpec(5, 2.0)
    assert custom.dispatch.budget_for("fireEvents") == RateBudgetSpec(20, 1.0)


def test_every_problem_is_reported_with_its_location(tmp_path: Path) -> None:
    text = """
destination:
  platform: netmera
  base_url: not-a-url
  secret: {env: NETMERA_API_KEY}
colour: blue
sources:
  - name: users
    path: data/users.csv
    attributes:
      age: integer
      likes: {type: string, mode: push}
    opt_ins: {push: p, whatsapp: w}
  - name: users
    kind: tags
    path: t.csv
    ext_id: id
dispatch:
  concurrency: 0
  batch_size: 5000
"""
    problems = _problems(_write(tmp_path, text))
    assert "unknown key(s) 'colour'" in problems[""]
    assert "destination.base_url" in problems
    assert "sources[0].attributes.age" in problems
    assert "sources[0].opt_ins" in problems and "whatsapp" in problems["sources[0].opt_ins"]
    assert "dispatch.concurrency" in problems
    assert len(problems) >= 5


def test_a_misspelt_key_is_refused_with_the_key_it_most_likely_means(tmp_path: Path) -> None:
    text = MINIMAL + "dispach: {concurrency: 2}\nvalidation: {timezon: UTC, colour: red}\n"
    problems = _problems(_write(tmp_path, text))
    assert problems[""] == "unknown key(s) 'dispach' (did you mean 'dispatch'?)"
    # A key like no known one is named without a guess.
    assert problems["validation"] == "unknown key(s) 'colour', 'timezon' (did you mean 'timezone'?)"


def test_semantic_problems_are_all_reported(tmp_path: Path) -> None:
    text = """
destination:
  platform: netmera
  base_url: https://restapi.netmera.com/rest/3.0/
  secret: {file: key.txt}
  verify_tls: false
validation: {timezone: Mars/Olympus}
sources:
  - name: users
    path: data/users.xlsx
    attributes:
      likes: {type: string, mode: push}
      tags_text: {mode: pull, type: list, on_null: unset}
  - name: users
    kind: tags
    path: t.csv
    ext_id: id
    attributes: {x: string}
dispatch:
  batch_size: 5000
"""
    problems = _problems(_write(tmp_path, text))
    assert "destination.verify_tls" in problems
    assert "validation.timezone" in problems
    assert "sources[0].format" in problems
    assert "sources[0].ext_id" in problems
    assert "needs type 'list'" in problems["sources[0].attributes.likes"]
    assert "on_null" in problems["sources[0].attributes.tags_text"]
    assert "duplicate source name" in problems["sources[1].name"]
    assert "sources[1].tag" in problems
    assert "not used by a source of kind 'tags'" in problems["sources[1].attributes"]
    assert "limit of 1000" in problems["dispatch.batch_size"]


@pytest.mark.parametrize(
    ("destination", "location"),
    [
        ("  secret: sk-live-0123456789abcdef\n", "destination.secret"),
        ("  secret: {env: NETMERA_API_KEY}\n  api_key: sk-live-0123456789abcdef\n", "destination.api_key"),
        # Named as the header that carries it: were taken as a setting the platform reads (Netmera: OK).
        (
            "  secret: {env: NETMERA_API_KEY}\n  extra: {X-Api-Key: sk-live-0123456789abcdef}\n",
            "destination.extra.X-Api-Key",
        ),
        (
            "  secret: {env: NETMERA_API_KEY}\n  extra: {Authorization: Bearer sk-live-0123456789abcdef}\n",
            "destination.extra.Authorization",
        ),
    ],
)
def test_a_literal_secret_is_refused_without_echoing_it(
    tmp_path: Path, destination: str, location: str
) -> None:
    text = f"destination:\n  platform: netmera\n  base_url: http://127.0.0.1:8080/rest/3.0/\n{destination}"
    text += "sources:\n  - {name: u, path: u.csv, ext_id: id, attributes: {a: string}}\n"
    with pytest.raises(BadJobError) as info:
        load_job(_write(tmp_path, text))
    messages = {p.location: p.message for p in info.value.problems}
    assert "never the secret itself" in messages[location]
    assert "sk-live-0123456789abcdef" not in str(info.value)
    assert len(messages) == 1  # no second, confusing schema message about the same key


def test_a_netmera_job_with_platform_settings_is_refused(tmp_path: Path) -> None:
    """Netmera takes no ``destination.extra`` setting: one written there (a typo, another platform's
    ``brand_id``) passed `validate` and was ignored in silence, as NotifyVisitors and Forms On Fire refuse theirs."""
    text = "destination:\n  platform: netmera\n  base_url: http://127.0.0.1:8080/rest/3.0/\n"
    text += "  secret: {env: NETMERA_API_KEY}\n  extra: {brand_id: '1000', os: IOS}\n"
    text += "sources:\n  - {name: u, path: u.csv, ext_id: id, attributes: {a: string}}\n"
    problems = _problems(_write(tmp_path, text))
    assert set(problems) == {"destination.extra.brand_id", "destination.extra.os"}
    assert "Netmera takes no destination.extra settings" in problems["destination.extra.os"]


def test_unreadable_or_malformed_job_files(tmp_path: Path) -> None:
    assert "cannot read job file" in str(_problems(tmp_path / "missing.yaml"))
    assert any("line 2" in loc for loc in _problems(_write(tmp_path, "a: [1,\nb: {", "bad.yaml")))
    assert "mapping" in _problems(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))[""]


def test_fixture_job_covers_every_source_kind() -> None:
    job = load_job(FIXTURES / "all_ops.yaml")
    assert {s.kind for s in job.sources} == set(SourceKind)


def test_schema_and_semantic_problems_are_reported_together(tmp_path: Path) -> None:
    text = """
destination: {platform: netmera, base_url: "http://127.0.0.1:8080/rest/3.0/", secret: {env: K}, verify_tls: false}
validation: {timezone: Nowhere/Atlantis}
sources:
  - {name: a, path: a.csv, ext_id: id, attributes: {x: integer}}
  - {name: b, path: b.csv, ext_id: id, attributes: {y: {type: string, mode: push}}}
dispatch: {batch_size: 2000, concurrency: -1}
"""
    problems = _problems(_write(tmp_path, text))
    assert set(problems) == {
        "sources[0].attributes.x",  # schema
        "sources[1].attributes.y",  # semantic, in a sound source
        "validation.timezone",  # semantic
        "dispatch.concurrency",  # schema
    }


def test_a_job_file_is_parsed_by_libyaml_and_a_faulty_one_worded_by_pyyaml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A job file is parsed by libyaml (1–2 ms for a 2 KB job, where PyYAML's own parser in Python took 6–13 ms of
    a run's start-up, issue 13) into the same data; a faulty one still gets PyYAML's words and place, and a key given
    twice is still refused with both lines."""
    import yaml
    import yaml.scanner

    from sync.config._yaml import _FastJobLoader, _JobLoader, read_job_yaml

    scanned = 0
    check_token = yaml.scanner.Scanner.check_token

    def counting(self: yaml.scanner.Scanner, *choices: type) -> bool:
        nonlocal scanned
        scanned += 1
        return check_token(self, *choices)

    monkeypatch.setattr(yaml.scanner.Scanner, "check_token", counting)
    assert load_job(FIXTURES / "all_ops.yaml").name
    assert scanned == 0  # PyYAML's Python scanner never ran

    faulty = tmp_path / "faulty.yaml"
    faulty.write_text("version: 1\nname: a: b\n", encoding="utf-8")
    with pytest.raises(BadJobError) as info:
        read_job_yaml(faulty)
    assert [(p.location, p.message) for p in info.value.problems] == [
        ("line 2, column 8", "mapping values are not allowed here")
    ]
    twice = tmp_path / "twice.yaml"
    twice.write_text("version: 1\nname: a\nversion: 2\n", encoding="utf-8")
    with pytest.raises(BadJobError) as info:
        read_job_yaml(twice)
    assert "duplicate key 'version' (first at line 1)" in str(info.value) and "line 3" in str(info.value)

    jobs = sorted(
        [*ROOT.joinpath("jobs").glob("*.yaml"), *FIXTURES.glob("*.yaml"), *ROOT.glob("sync/*/*.yaml")]
    )
    assert len(jobs) >= 5
    for job in jobs:
        text = job.read_text(encoding="utf-8")
        assert yaml.load(text, Loader=_FastJobLoader) == yaml.load(text, Loader=_JobLoader), job


def test_a_key_is_the_name_written_not_what_yaml_1_1_makes_of_it(tmp_path: Path) -> None:
    """``on:``, ``NO:`` (Norway), ``010:`` and ``1:30:`` are names in a job file; YAML 1.1 reads them unquoted as
    true, false, 8 and 90 — a column called ``on`` was looked for as ``True``, and ``on:`` beside ``yes:`` was
    refused as a duplicate key 'True'. Both parsers read them alike."""
    import yaml

    from sync.config._yaml import _FastJobLoader, _JobLoader

    text = MINIMAL.replace(
        "attributes: {name: string}",
        "attributes: {on: string, yes: boolean, 010: number, 1:30: string, name: string}\n"
        "    opt_ins: {categories: {NO: no_opt_in, ON: on_opt_in}}",
    )
    job = load_job(_write(tmp_path, text))
    users = job.sources[0]
    assert [a.column for a in users.attributes] == ["on", "yes", "010", "1:30", "name"]
    assert users.opt_ins.categories == {"NO": "no_opt_in", "ON": "on_opt_in"}
    assert yaml.load(text, Loader=_FastJobLoader) == yaml.load(text, Loader=_JobLoader)
    # Values keep YAML's reading (the schema refuses a misread one), and a merge key still merges.
    assert yaml.load("a: &x {k: 1}\nb: {<<: *x, on: off}\n", Loader=_JobLoader) == {
        "a": {"k": 1},
        "b": {"k": 1, "on": False},
    }


def test_a_value_yaml_reads_other_than_it_looks_is_refused_with_what_to_write(tmp_path: Path) -> None:
    """A value YAML 1.1 reads as another type than it looks is refused saying how to write it: ``NO`` (a country
    code) is false, ``0012`` a number, ``1:30`` is 90 (seconds, for a period), ``1e3`` and ``"30"`` are text."""
    text = MINIMAL.replace(
        "  secret: {env: NETMERA_API_KEY}\n",
        "  secret: {env: NETMERA_API_KEY}\n  extra: {country: NO, app: 0012}\n",
    )
    text += (
        "dispatch:\n  request_timeout: 1e3\n  concurrency: '4'\n  budgets: {'*': {requests: 5, per: 1:30}}\n"
    )
    problems = _problems(_write(tmp_path, text))
    assert problems["destination.extra.country"] == (
        "must be a string, not true or false; YAML reads an unquoted yes, no, on, off, true or false as true or "
        'false: quote it ("NO")'
    )
    assert problems["destination.extra.app"] == (
        'must be a string, not a number; YAML reads an unquoted 00123 or 1:30 as a number: quote it ("00123")'
    )
    assert problems["dispatch.budgets.*.per"] == (
        "must be a string, not a number; a period has a unit: 500ms, 1s, 1m or 1h (YAML reads 1:30 as 90)"
    )
    in_full = '; write the number unquoted and in full (1000, not "1000" or 1e3: YAML reads those as text)'
    assert problems["dispatch.request_timeout"] == "must be a number, not a string" + in_full
    assert problems["dispatch.concurrency"] == "must be an integer, not a string" + in_full
    assert len(problems) == 5


@pytest.mark.parametrize(("written", "said"), [(".nan", "NaN (.nan)"), (".inf", "infinity (.inf)")])
def test_nan_and_infinity_are_refused_wherever_a_number_goes(tmp_path: Path, written: str, said: str) -> None:
    """The schema's minimum and maximum let NaN through (every comparison with it is false): `validate` said OK
    to a NaN threshold (never tripped) and a NaN or infinite timeout, delay or budget period."""
    text = MINIMAL + (
        f"dispatch:\n  request_timeout: {written}\n  retry: {{max_delay: {written}}}\n"
        f"  budgets: {{'*': {{requests: 5, period: {written}}}}}\n"
        f"thresholds: {{max_rejected_share: {written}}}\n"
    )
    problems = _problems(_write(tmp_path, text))
    assert problems == {
        where: f"must be a finite number, not {said}"
        for where in (
            "dispatch.budgets.*.period",
            "dispatch.request_timeout",
            "dispatch.retry.max_delay",
            "thresholds.max_rejected_share",
        )
    }


def test_a_job_file_large_as_written_is_not_blamed_on_aliases(tmp_path: Path) -> None:
    """A file of 60,000 plain keys was refused as expanding "through YAML aliases", which it has none of."""
    big = MINIMAL + "".join(f"k{i}: {i}\n" for i in range(60_000))
    (said,) = _problems(_write(tmp_path, big)).values()
    assert said.startswith("the file holds more than 100,000 values; a job file is small")
    assert "alias" not in said
    bomb = (
        MINIMAL
        + "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7))
    )
    (said,) = _problems(_write(tmp_path, bomb, "bomb.yaml")).values()
    assert "through YAML aliases" in said


def test_a_workdir_under_home_is_under_home_as_every_path_of_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``workdir: ~/state/nightly`` made a directory named "~" beside the job file (the secret's file, the
    sources' paths and the alert and database files all take ``~`` as the home directory)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    job = load_job(_write(jobs, MINIMAL + "workdir: ~/state/nightly\n"))
    assert job.workdir == home / "state" / "nightly"


def test_a_setting_ending_with_a_line_break_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's ``$`` matches before a final line break, so ``^...$`` let ``name: "mini\\n"`` (a YAML ``|``
    block) and a base URL from a variable read from a file through: the workdir's name held a line break, and
    the base URL became ``.../rest/3.0/\\n/``."""
    monkeypatch.setenv("NM_URL", "http://127.0.0.1:8080/rest/3.0/\n")
    text = MINIMAL.replace("name: mini", 'name: "mini\\n"').replace(
        "base_url: http://127.0.0.1:8080/rest/3.0", "base_url: ${NM_URL}"
    )
    text += "dispatch:\n  budgets:\n    '*':\n      requests: 5\n      per: |\n        1s\n"
    problems = _problems(_write(tmp_path, text))
    assert problems == {
        "name": "ends with a line break (it must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$)",
        "destination.base_url": "ends with a line break (it must match ^https?://[^\\s]+$)",
        "dispatch.budgets.*.per": "ends with a line break (it must match ^[0-9]+(\\.[0-9]+)?\\s*(ms|s|m|h)$)",
    }
    monkeypatch.setenv("NM_URL", "http://127.0.0.1:8080/rest/3.0/")
    assert load_job(_write(tmp_path, MINIMAL + "description: |\n  nightly\n  CRM sync\n")).name == "mini"


def test_a_second_document_or_a_tab_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    """PyYAML says only "but found another document" of a second '---' document, and "found character '\\t' that
    cannot start any token" of a tab-indented line: the message now says what to change."""
    two = _problems(_write(tmp_path, MINIMAL + "---\nname: other\n", "two.yaml"))
    assert two == {
        "line 12, column 1": "a job file is one YAML document, and a '---' line here starts another: remove it, "
        "or write a second job file"
    }
    tabbed = _problems(_write(tmp_path, MINIMAL.replace("    ext_id: id", "\text_id: id"), "tab.yaml"))
    assert tabbed == {
        "line 10, column 1": "found character '\\t' that cannot start any token: indent with spaces, YAML does "
        "not allow tabs there"
    }


def test_a_misspelt_endpoint_is_refused_with_the_endpoint_it_most_likely_means(tmp_path: Path) -> None:
    text = MINIMAL + (
        "dispatch:\n  batch_size: {tagUser: 500}\n  budgets: {enablePsh: {requests: 5, per: 1s}}\n"
        "  budget_groups: {account: {requests: 5, per: 1s, endpoints: [zzz]}}\n"
    )
    problems = _problems(_write(tmp_path, text))
    assert problems["dispatch.batch_size.tagUser"].startswith(
        "netmera has no endpoint 'tagUser'; did you mean 'tagUsers'? its endpoints: tagUsers, "
    )
    assert "did you mean 'enablePush'? its endpoints:" in problems["dispatch.budgets.enablePsh"]
    assert "did you mean" not in problems["dispatch.budget_groups.account.endpoints.zzz"]


@pytest.mark.parametrize("per", ["1d", "1 sec", "1,5s", "s"])
def test_a_period_without_a_known_unit_is_refused_in_words(tmp_path: Path, per: str) -> None:
    """`per: 1d` was refused as "'1d' does not match '^[0-9]+(\\\\.[0-9]+)?\\\\s*(ms|s|m|h)$'"."""
    text = MINIMAL + f"dispatch:\n  budgets: {{'*': {{requests: 5, per: '{per}', margin: '{per}'}}}}\n"
    problems = _problems(_write(tmp_path, text))
    said = "not a period: a number and a unit, ms, s, m or h (500ms, 1s, 1.5m, 24h)"
    assert problems == {"dispatch.budgets.*.per": said, "dispatch.budgets.*.margin": said}


def test_an_unknown_key_with_the_shape_of_a_secret_is_not_repeated(tmp_path: Path) -> None:
    """A secret pasted as a mapping's key (``sk_live_...: 1``) was echoed by "unknown key(s) 'sk_live_...'"."""
    pasted = "sk_live_0123456789abcdefXYZ"
    text = MINIMAL.replace(
        "  secret: {env: NETMERA_API_KEY}\n", f"  secret: {{env: NETMERA_API_KEY}}\n  {pasted}: 1\n"
    )
    with pytest.raises(BadJobError) as info:
        load_job(_write(tmp_path, text + "dispach: {}\n"))
    problems = {p.location: p.message for p in info.value.problems}
    assert problems == {
        "": "unknown key(s) 'dispach' (did you mean 'dispatch'?)",
        "destination": "unknown key(s) one with the shape of a secret (not shown)",
    }
    assert pasted not in str(info.value)
