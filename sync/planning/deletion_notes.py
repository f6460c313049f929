"""What ``pushsync plan`` says about a plan's deletions beside its request counts: the users a deletions source
deletes that other sources of the same run also change (:func:`deletion_notes`).

Deletions go last, so those users get their changes or events and are then deleted with them: harmless, but
worth saying — a deletions file that lists current users (the wrong export, a join gone wrong) deletes them for
good, and the plan's ``deleteUsersPermanently … N IDs`` alone does not show it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from sync.config import Job, SourceKind
from sync.planning.validation import EXT_ID

__all__ = ["deletes_and_changes", "deletion_notes"]


def deletes_and_changes(job: Job) -> bool:
    """Whether ``job`` has a deletions source and another source: :func:`deletion_notes` may have something to
    say (and reads the plan's frames, so the plan must keep them)."""
    kinds = [s.kind is SourceKind.DELETIONS for s in job.sources]
    return any(kinds) and not all(kinds)


def _ids(staged: Any) -> pl.DataFrame:
    frames = [f.select(EXT_ID) for f in staged.frames()]
    return pl.concat(frames).unique() if frames else pl.DataFrame(schema={EXT_ID: pl.String})


def deletion_notes(staged: Sequence[Any]) -> list[str]:
    """One note per deletions source whose users other sources of the plan change too (``staged``: the plan's
    :class:`sync.planning.planning.StagedSource` list, frames kept), naming those sources and how many users
    each shares with it."""
    notes = []
    others = [s for s in staged if s.source.kind is not SourceKind.DELETIONS]
    for deletions in (s for s in staged if s.source.kind is SourceKind.DELETIONS):
        doomed = _ids(deletions)
        if not others or doomed.is_empty():
            continue
        shared = []
        for other in others:
            hits = [f.select(EXT_ID).join(doomed, on=EXT_ID, how="semi") for f in other.frames()]
            n = pl.concat(hits).n_unique() if hits else 0
            if n:
                shared.append(f"{n} by {other.source.name}")
        if shared:
            notes.append(
                f"source {deletions.source.name} deletes {doomed.height} users, some of whom this run also "
                f"changes or sends events for ({', '.join(shared)}): those go first, then the users are deleted "
                "with them (deletions go last); check that the deletions file lists no current users"
            )
    return notes
