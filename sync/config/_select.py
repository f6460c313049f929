"""``--select`` / ``--exclude``: run or plan some of a job's sources only (``pushsync plan|run``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sync.config._job import AttributeMode, Job, SourceKind, SyncMode
from sync.errors import BadJobError, JobProblem

__all__ = ["sample_notes", "select_sources", "split_names"]


def sample_notes(job: Job) -> list[str]:
    """What a sample (``--limit N``) of ``job`` sends that the next full run cannot take back or will send again,
    one note per source: its events or pushed list values (not idempotent: sent again by the next run, which plans
    the whole input), its deletions (permanent). Told with ``plan`` and ``run --limit``; before, a sample run sent
    them without a word, the warning being in docs/run.md only."""
    notes = []
    for s in job.sources:
        pushed = [m.attribute for m in s.attributes if m.mode is AttributeMode.PUSH]
        if s.kind is SourceKind.EVENTS:
            what = "its events"
        elif s.kind is SourceKind.USERS and pushed:
            what = f"the values it pushes to {', '.join(pushed)}"
        elif s.kind is SourceKind.DELETIONS:
            notes.append(
                f"--limit deletes the first users of source {s.name} for good (deleteUsersPermanently); "
                f"sample without them: --exclude {s.name}"
            )
            continue
        else:
            continue
        notes.append(
            f"--limit sends {what} (source {s.name}), which are not idempotent: the next run without --limit "
            f"sends them again; sample without them: --exclude {s.name}"
        )
    return notes


def split_names(values: Sequence[str] | None) -> tuple[str, ...]:
    """``["a,b", "c"]`` (repeated options, comma lists) → ``("a", "b", "c")``; blanks dropped."""
    return tuple(n.strip() for v in values or () for n in v.split(",") if n.strip())


def select_sources(job: Job, select: Sequence[str] = (), exclude: Sequence[str] = ()) -> Job:
    """``job`` with only the sources named by ``select`` (all when empty) minus those named by ``exclude``.

    Raises :class:`BadJobError` (exit 2, nothing sent) for an unknown name (the job's sources are listed), for a
    selection that leaves no source, and in snapshot mode: the state holds what every source last sent, and a
    partial run would have to leave the unselected sources' users alone — refusing is the safe reading."""
    if not select and not exclude:
        return job
    names = [s.name for s in job.sources]
    known = ", ".join(names)
    problems = [
        JobProblem(option, f"no source named {name!r} in the job (its sources: {known})")
        for option, given in (("--select", select), ("--exclude", exclude))
        for name in given
        if name not in names
    ]
    if job.mode is SyncMode.SNAPSHOT:
        problems.append(
            JobProblem(
                "--select" if select else "--exclude",
                "not available in snapshot mode: the state covers every source, and a run of some of them "
                "would diff the others against nothing; run the whole job (or split it into jobs)",
            )
        )
    kept = tuple(s for s in job.sources if (not select or s.name in select) and s.name not in exclude)
    if not problems and not kept:
        problems.append(JobProblem("--exclude", "no source left to run"))
    if problems:
        raise BadJobError(str(job.path), problems)
    return dataclasses.replace(job, sources=kept)
