"""The rows of a Netmera users source that contradict themselves, refused at plan time: :func:`check_rows`.

A users row sends each of its operations in its own stream, and the streams of one phase are sent side by side
(:mod:`sync.dispatch`). A row that adds a tag and removes it (``segs=Sport|VIP`` tagged, ``drop=Sport``
untagged), or pushes a value onto a list attribute and pulls the same value from it, sends ``tagUsers`` and
``untagUsers`` (``pushProfileAttributes`` and ``pullProfileAttributes``) in the same phase: whichever lands last
decides, so the user held the tag after some runs of the same input and not after others. No order of the two
requests is the row's meaning either (it says both), so the row is bad input: rejected with its file, row and
columns, and nothing of it is sent. (Through the planner's duplicate rule its user is then held, as for any
rejected newest row; in snapshot mode the user's state stays as it was.)

Private: the builder module :mod:`sync.platforms.netmera.requests` re-exports :func:`check_rows`.
"""

from __future__ import annotations

import polars as pl

from sync.config import AttributeMode, Source, SourceKind, TagAction
from sync.platforms._row_checks import split_by_checks

__all__ = ["check_rows"]


def _conflict(added: str, removed: str, reason: str) -> pl.Expr:
    """``reason`` where the list columns ``added`` and ``removed`` share a value (null elsewhere, a null list
    shares nothing). The value itself is not named: it may be personal data."""
    shared = pl.col(added).list.set_intersection(pl.col(removed)).list.len()
    return pl.when(shared > 0).then(pl.lit(reason))


def _checks(source: Source) -> list[tuple[str, pl.Expr]]:
    """``(column, reason)`` per pair of columns of ``source`` whose values must not meet in one row."""
    checks: list[tuple[str, pl.Expr]] = []
    adds = [t.column for t in source.tags if t.action is TagAction.TAG]
    removes = [t.column for t in source.tags if t.action is TagAction.UNTAG]
    for added in dict.fromkeys(adds):
        for removed in dict.fromkeys(removes):
            reason = (
                f"{added} adds and {removed} removes the same tag: tagUsers and untagUsers would be sent side "
                "by side, and the user would hold the tag after some runs and not after others"
            )
            checks.append((removed, _conflict(added, removed, reason)))
    pushed = [a for a in source.attributes if a.mode is AttributeMode.PUSH]
    pulled = [a for a in source.attributes if a.mode is AttributeMode.PULL]
    for push in pushed:
        for pull in pulled:
            if push.attribute != pull.attribute:
                continue
            reason = (
                f"{push.column} pushes and {pull.column} pulls the same value of attribute {push.attribute}: "
                "pushProfileAttributes and pullProfileAttributes would be sent side by side, and the value "
                "would be there after some runs and not after others"
            )
            checks.append((pull.column, _conflict(push.column, pull.column, reason)))
    return checks


def check_rows(source: Source, clean: pl.DataFrame, file_name: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a users source's clean rows into those Netmera gets and the rejects (file, row, column, reason,
    ID) of the rows that add and remove the same tag, or push and pull the same value of one list attribute.

    ``column`` is the removing column (``untag`` tags, ``pull`` attribute); the reason names both columns and
    the pair's requests. A row's reason is its first contradiction, tags first, in the job's column order.
    Other sources (and a users source without such pairs of columns) are kept whole."""
    checks = _checks(source) if source.kind is SourceKind.USERS else []
    return split_by_checks(clean, checks, file_name)
