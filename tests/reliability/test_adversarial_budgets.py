"""Adversarial corpus: budgets (issue #11, #14). Endpoint names the platform does not have — under ``budgets``,
``batch_size``, ``per_endpoint_concurrency`` or a budget group —, groups of no endpoint, periods of zero and
margins that leave nothing of a period are refused by ``pushsync validate`` (exit 2), every problem at once,
each naming where it is and listing the platform's endpoints; nothing is sent. Good budget settings load into
the objects the run uses (``docs/reliability.md``, "Adversarial corpus: budgets")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sync.cli import main
from sync.config import BudgetGroupSpec, RateBudgetSpec, load_job
from sync.errors import BadJobError, ExitCode
from sync.platforms.registry import REGISTRY

HEAD = """
name: budgets
destination:
  platform: {platform}
  base_url: http://127.0.0.1:8080/rest/3.0
  secret: {{env: SOME_KEY}}
  extra: {extra}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes: {{name: string}}
dispatch:
"""


def _job(tmp_path: Path, dispatch: str, platform: str = "netmera", extra: str = "{}") -> Path:
    (tmp_path / "users.csv").write_text("id,name\nu1,Ann\n", encoding="utf-8")
    path = tmp_path / "job.yaml"
    body = "".join(f"  {line}\n" for line in dispatch.strip().splitlines())
    path.write_text(HEAD.format(platform=platform, extra=extra) + body, encoding="utf-8")
    return path


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(BadJobError) as info:
        load_job(path)
    return {p.location: p.message for p in info.value.problems}


# Each case: the dispatch section, and the problem locations it must produce (and no others).
CASES = {
    "unknown endpoint under budgets": (
        "budgets: {tagUser: {requests: 5, per: 1s}}",
        {"dispatch.budgets.tagUser"},
    ),
    "unknown endpoint under batch_size": (
        "batch_size: {setProfile: 100}",
        {"dispatch.batch_size.setProfile"},
    ),
    "unknown endpoint under per_endpoint_concurrency": (
        "per_endpoint_concurrency: {fire_events: 2}",
        {"dispatch.per_endpoint_concurrency.fire_events"},
    ),
    "unknown endpoint in a group": (
        "budget_groups: {account: {requests: 20, per: 1s, endpoints: [tagUsers, tag_users]}}",
        {"dispatch.budget_groups.account.endpoints.tag_users"},
    ),
    "a group of zero endpoints": (
        "budget_groups: {account: {requests: 20, per: 1s, endpoints: []}}",
        {"dispatch.budget_groups.account.endpoints"},
    ),
    "a budget period of zero": (
        "budgets: {tagUsers: {requests: 5, per: 0s}}",
        {"dispatch.budgets.tagUsers.per"},
    ),
    "a group period of zero": (
        'budget_groups: {account: {requests: 5, per: 0ms, endpoints: ["*"]}}',
        {"dispatch.budget_groups.account.per"},
    ),
    "a margin as long as the period": (
        "budgets: {tagUsers: {requests: 5, per: 1s, margin: 1s}}",
        {"dispatch.budgets.tagUsers.margin"},
    ),
    "a budget with both per and period": (
        "budgets: {tagUsers: {requests: 5, per: 1m, period: 1}}",
        {"dispatch.budgets.tagUsers.period"},
    ),
    "a group with both per and period": (
        'budget_groups: {account: {requests: 5, per: 1s, period: 60, endpoints: ["*"]}}',
        {"dispatch.budget_groups.account.period"},
    ),
    "every problem at once": (
        "budgets: {nope: {requests: 5, per: 0s}}\nbatch_size: {nope2: 10}\n"
        "budget_groups: {g: {requests: 1, per: 1s, endpoints: []}}",
        {
            "dispatch.budgets.nope",
            "dispatch.budgets.nope.per",
            "dispatch.batch_size.nope2",
            "dispatch.budget_groups.g.endpoints",
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_budget_settings_are_refused_with_every_problem_named(tmp_path: Path, case: str) -> None:
    dispatch, locations = CASES[case]
    problems = _problems(_job(tmp_path, dispatch))
    assert set(problems) == locations
    for location, message in problems.items():
        if "endpoint '" in message:
            # The platform's endpoints are listed, so the user can pick the right name.
            assert "tagUsers" in message and "deleteUsersPermanently" in message, (location, message)


def test_validate_refuses_an_unknown_endpoint_and_lists_the_platforms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _job(
        tmp_path,
        'budgets: {"user/creat": {requests: 5, per: 1m}}',
        platform="notifyvisitors",
        extra="{brand_id: '1'}",
    )
    code = main(["validate", str(path), "--output", "json", "--no-files"])
    assert code == ExitCode.BAD_JOB_OR_INPUT
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p["location"] for p in problems] == ["dispatch.budgets.user/creat"]
    assert "user/create, event/create" in problems[0]["message"]


def test_good_budget_settings_load_into_groups_and_specs(tmp_path: Path) -> None:
    path = _job(
        tmp_path,
        """
budgets: {"*": {requests: 20, per: 1s}, fireEvents: {requests: 5, per: 1s, align: false, margin: 50ms}}
batch_size: {fireEvents: 100}
per_endpoint_concurrency: {tagUsers: 2}
budget_groups:
  account: {requests: 20, per: 1s, endpoints: ["*"]}
  users: {requests: 600, per: 1m, endpoints: [tagUsers, untagUsers, tagUsers], margin: 0.2}
""",
    )
    job = load_job(path)
    assert job.dispatch.budgets["fireEvents"] == RateBudgetSpec(5, 1.0, align=False, margin=0.05)
    assert job.dispatch.budget_groups == (
        BudgetGroupSpec("account", RateBudgetSpec(20, 1.0), ("*",)),
        BudgetGroupSpec("users", RateBudgetSpec(600, 60.0, margin=0.2), ("tagUsers", "untagUsers")),
    )
    assert [g.name for g in job.dispatch.groups_for("untagUsers")] == ["account", "users"]
    assert [g.name for g in job.dispatch.groups_for("fireEvents")] == ["account"]


def test_a_star_under_per_endpoint_concurrency_caps_each_endpoint_not_named(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path, 'per_endpoint_concurrency: {"*": 1, fireEvents: 3}'))
    caps = job.dispatch.per_endpoint_concurrency
    assert caps["tagUsers"] == 1 and caps["untagUsers"] == 1 and caps["fireEvents"] == 3


def test_notifyvisitors_limits_are_groups_per_api_family_and_a_job_may_replace_one(tmp_path: Path) -> None:
    path = _job(
        tmp_path,
        'budget_groups: {user: {requests: 30, per: 1m, endpoints: ["user/create"]}}',
        platform="notifyvisitors",
        extra="{brand_id: '1'}",
    )
    groups = {g.name: g for g in load_job(path).dispatch.budget_groups}
    assert groups["user"].budget == RateBudgetSpec(30, 60.0)  # the job's
    assert groups["event"].budget == RateBudgetSpec(500, 60.0)  # the platform's documented default


def test_the_endpoint_lists_match_the_platforms_operation_tables() -> None:
    from sync.platforms.formsonfire import ENDPOINT
    from sync.platforms.netmera.requests import ENDPOINT_FOR as NETMERA
    from sync.platforms.notifyvisitors.requests import ENDPOINT_FOR as NOTIFYVISITORS

    assert set(REGISTRY["netmera"].limits.endpoints) == set(NETMERA.values())
    assert set(REGISTRY["notifyvisitors"].limits.endpoints) == set(NOTIFYVISITORS.values())
    assert REGISTRY["formsonfire"].limits.endpoints == (ENDPOINT,)
