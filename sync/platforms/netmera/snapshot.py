"""Netmera's snapshot streams: the requests a snapshot delta (:mod:`sync.state`) makes.

A delta frame holds the source's columns with only new or changed values, plus the four delta columns of
:mod:`sync.platforms.base`. Its streams are the planner's streams of the source seen through the delta (values
present are sent, nothing is unset for being empty, tags added and removed are two tag columns), plus
``unsetProfileAttributes`` from :data:`~sync.platforms.base.DELTA_UNSET` and ``deleteUsersPermanently`` from
:data:`~sync.platforms.base.DELTA_DELETE`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import polars as pl

from sync.config import NullAction, Source, TagAction, TagColumn
from sync.platforms.base import (
    DELTA_DELETE,
    DELTA_TAGS_ADDED,
    DELTA_TAGS_REMOVED,
    DELTA_UNSET,
    GROUP,
    PAYLOAD,
)
from sync.platforms.netmera._shapes import ext_ids_body, unset_attributes_body
from sync.platforms.netmera._streams import Stream, streams_for
from sync.records import Batch, Operation, Phase

__all__ = ["batch_group", "snapshot_streams"]

_EXT_ID, _FILE, _ROW = "__ext_id", "__file", "__row"


def _delta_source(source: Source) -> Source:
    """The source as the planner's stream builders should see a delta frame: values present are sent, nothing is
    unset for being empty (unsets come from ``__unset``), tags added and removed are two tag columns."""
    return dataclasses.replace(
        source,
        attributes=tuple(dataclasses.replace(a, on_null=NullAction.SKIP) for a in source.attributes),
        tags=(TagColumn(DELTA_TAGS_ADDED), TagColumn(DELTA_TAGS_REMOVED, action=TagAction.UNTAG)),
    )


def _list_rows(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    return frame.filter(pl.col(column).list.len() > 0).select(
        _EXT_ID, _FILE, _ROW, pl.lit("").alias(GROUP), pl.col(column).alias(PAYLOAD)
    )


def _flag_rows(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    return frame.filter(pl.col(column).fill_null(False)).select(
        _EXT_ID, _FILE, _ROW, pl.lit("").alias(GROUP), pl.lit(None, pl.Null).alias(PAYLOAD)
    )


def snapshot_streams(source: Source) -> list[Stream]:
    """The request streams a source's delta frames make: the planner's streams plus unset and delete."""
    streams = streams_for(_delta_source(source))
    streams.append(
        Stream(
            Operation.UNSET_ATTRIBUTES,
            Phase.CHANGES,
            (DELTA_UNSET,),
            lambda f: _list_rows(f, DELTA_UNSET),
            lambda _g, rows: unset_attributes_body(rows),
        )
    )
    streams.append(
        Stream(
            Operation.DELETE_USERS,
            Phase.DELETIONS,
            (DELTA_DELETE,),
            lambda f: _flag_rows(f, DELTA_DELETE),
            lambda _g, rows: ext_ids_body([r[0] for r in rows]),
        )
    )
    return streams


def batch_group(batch: Batch) -> str:
    """The group of a batch of a snapshot stream: the tag of a tag or untag request, else ``""``."""
    if batch.operation not in (Operation.TAG, Operation.UNTAG):
        return ""
    body = json.loads(batch.body) if isinstance(batch.body, bytes | bytearray) else batch.body
    return str(body.get("tag", "")) if isinstance(body, Mapping) else ""
