"""``${NAME}`` interpolation in the few job settings that differ between environments (docs/jobs.md).

Only ``destination.base_url``, ``workdir`` and each source's ``path``/``paths`` are interpolated: a staging and a
production run of one job file differ there, and nowhere else should the environment change what a job means.
``${NAME}`` is the variable's value, ``${NAME:-default}`` the default when it is unset or empty, ``$$`` a literal
``$``; any other ``$`` is left as written. A variable that is unset, with no default, is a job problem naming the
variable and the setting — never the value of anything (the value may be a secret put in the wrong variable;
the checks after interpolation, such as the base URL's, see the interpolated value and do not print it either).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from sync.errors import JobProblem

__all__ = ["interpolate_job"]

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(text: str, location: str, env: Mapping[str, str], problems: list[JobProblem]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        problems.append(
            JobProblem(
                location,
                f"environment variable {name} is not set (write ${{{name}:-default}} to give a default, "
                "$$ for a literal $)",
            )
        )
        return match.group(0)

    return _REFERENCE.sub(one, text)


def interpolate_job(
    raw: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[JobProblem]]:
    """``raw`` (a job file as read) with ``${NAME}`` references replaced in the settings above, and the problems
    (unset variables without a default). ``raw`` itself is not changed."""
    env = os.environ if env is None else env
    problems: list[JobProblem] = []
    out = dict(raw)
    dest = raw.get("destination")
    if isinstance(dest, Mapping) and isinstance(dest.get("base_url"), str):
        out["destination"] = {
            **dest,
            "base_url": _expand(dest["base_url"], "destination.base_url", env, problems),
        }
    if isinstance(raw.get("workdir"), str):
        out["workdir"] = _expand(raw["workdir"], "workdir", env, problems)
    sources = raw.get("sources")
    if isinstance(sources, list):
        new_sources: list[Any] = []
        for i, source in enumerate(sources):
            if not isinstance(source, Mapping):
                new_sources.append(source)
                continue
            source = dict(source)
            if isinstance(source.get("path"), str):
                source["path"] = _expand(source["path"], f"sources[{i}].path", env, problems)
            if isinstance(source.get("paths"), list):
                source["paths"] = [
                    _expand(p, f"sources[{i}].paths[{j}]", env, problems) if isinstance(p, str) else p
                    for j, p in enumerate(source["paths"])
                ]
            new_sources.append(source)
        out["sources"] = new_sources
    return out, problems
