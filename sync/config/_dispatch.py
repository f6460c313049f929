"""The job's ``dispatch`` section: rate budgets, budget groups, retries, concurrency, batch sizes — and the
checks the schema cannot express (endpoint names the platform has, periods above zero, groups with members)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from sync.config._platforms import PlatformLimits
from sync.config._settings import BudgetGroupSpec, DispatchSettings, RateBudgetSpec, RetryPolicy
from sync.errors import JobProblem

_PER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: Any) -> float:
    """``"50ms"``, ``"1m"`` or a number of seconds (the schema already checked the spelling)."""
    if isinstance(value, int | float):
        return float(value)
    match = _PER.match(str(value))
    assert match is not None
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _spec(raw: Mapping[str, Any], where: str, problems: list[JobProblem]) -> RateBudgetSpec | None:
    if "per" in raw and "period" in raw:
        # Two periods for one budget: taking either in silence sends at a rate the job did not mean.
        problems.append(
            JobProblem(
                f"{where}.period",
                f"a budget takes per or period, not both (per: {raw['per']}, period: {raw['period']}): keep one",
            )
        )
        return None
    period = float(raw["period"]) if "period" in raw else _duration(raw.get("per", "1s"))
    margin = _duration(raw["margin"]) if "margin" in raw else None
    if period <= 0:
        given = f"per: {raw['per']}" if "per" in raw else f"period: {raw['period']}"
        problems.append(
            JobProblem(
                f"{where}.per" if "per" in raw else f"{where}.period",
                f"a budget's period must be longer than 0 ({given}); e.g. per: 1s",
            )
        )
        return None
    if margin is not None and margin >= period:
        problems.append(
            JobProblem(f"{where}.margin", f"a margin of {margin:g} s leaves nothing of a {period:g} s period")
        )
        return None
    align = bool(raw.get("align", True))
    if margin is not None and align and margin * 1.25 >= period:
        # Aligned releases happen in [start + margin / 4, end - margin): with no such zone the budget could
        # not align at all, and silently sending N per period + margin instead is not what the job says.
        problems.append(
            JobProblem(
                f"{where}.margin",
                f"a margin of {margin:g} s leaves no time to send in a {period:g} s window (a quarter of it "
                f"is also kept after the window's start): at most {period * 0.8 - 0.001:g} s, or align: false",
            )
        )
        return None
    return RateBudgetSpec(requests=int(raw["requests"]), period=period, align=align, margin=margin)


def _unknown(
    names: Any, where: str, platform: str, limits: PlatformLimits | None, problems: list[JobProblem]
) -> None:
    known = limits.endpoints if limits is not None else ()
    if not known:
        return
    for name in names:
        if name != "*" and name not in known:
            # An endpoint misspelt by a letter (tagUser) is named, not left to be found in a list of seventeen.
            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                JobProblem(
                    f"{where}.{name}",
                    f"{platform} has no endpoint {name!r}; {hint}its endpoints: {', '.join(known)}",
                )
            )


def parse_dispatch(
    raw: Mapping[str, Any], platform: str, limits: PlatformLimits | None, problems: list[JobProblem]
) -> tuple[DispatchSettings, dict[str, int]]:
    """Settings and batch sizes (``"*"`` for endpoints not named) from a schema-valid ``dispatch`` section,
    over the platform's defaults (``limits``, from the platform registry; None when the platform is unknown);
    problems found are appended to ``problems``."""
    budgets: dict[str, RateBudgetSpec] = dict(limits.default_budgets) if limits is not None else {}
    for endpoint, spec_raw in (raw.get("budgets") or {}).items():
        spec = _spec(spec_raw, f"dispatch.budgets.{endpoint}", problems)
        if spec is not None:
            budgets[endpoint] = spec
    _unknown(raw.get("budgets") or {}, "dispatch.budgets", platform, limits, problems)
    groups: dict[str, BudgetGroupSpec] = {
        g.name: g for g in (limits.default_budget_groups if limits is not None else ())
    }
    for name, group_raw in (raw.get("budget_groups") or {}).items():
        where = f"dispatch.budget_groups.{name}"
        endpoints = tuple(dict.fromkeys(group_raw["endpoints"]))
        if not endpoints:
            problems.append(
                JobProblem(f"{where}.endpoints", 'a group needs endpoints (["*"] for all of them)')
            )
            continue
        _unknown(endpoints, f"{where}.endpoints", platform, limits, problems)
        spec = _spec(group_raw, where, problems)
        if spec is not None:
            groups[name] = BudgetGroupSpec(name, spec, endpoints)  # replaces a platform default of that name
    retry_raw = raw.get("retry") or {}
    retry_kwargs: dict[str, Any] = {
        k: (int(v) if k == "max_attempts" else float(v)) for k, v in retry_raw.items()
    }
    retry = RetryPolicy(**retry_kwargs)
    kwargs: dict[str, Any] = {
        k: raw[k]
        for k in (
            "concurrency",
            "request_timeout",
            "drain_timeout",
            "queue_size",
            "abort_after_connection_failures",
        )
        if k in raw
    }
    per_endpoint = dict(raw.get("per_endpoint_concurrency") or {})
    _unknown(per_endpoint, "dispatch.per_endpoint_concurrency", platform, limits, problems)
    if "*" in per_endpoint and limits is not None:
        # "*" caps every endpoint not named, as under budgets and batch_size: spelt out per endpoint, so that
        # whatever reads the caps (the plan's estimate too) finds each one; "*" stays for names not listed.
        per_endpoint = {e: per_endpoint["*"] for e in limits.endpoints} | per_endpoint
    settings = DispatchSettings(
        **kwargs,
        per_endpoint_concurrency=per_endpoint,
        budgets=budgets,
        retry=retry,
        budget_groups=tuple(groups.values()),
    )
    sizes_raw = raw.get("batch_size", {})
    sizes = {"*": limits.default_batch_size if limits is not None else 1000}
    if isinstance(sizes_raw, int):
        sizes["*"] = sizes_raw
    else:
        sizes.update({k: int(v) for k, v in sizes_raw.items()})
        _unknown(sizes_raw, "dispatch.batch_size", platform, limits, problems)
    return settings, sizes
