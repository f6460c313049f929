"""Netmera REST API 3.0 request bodies, batch IDs and batch splitting. Pure functions: no I/O.

Body shapes (seed 001, ``/work/shared/platforms.md`` §1):

===========================================  ===================================================
endpoint                                     body
===========================================  ===================================================
``tagUsers`` / ``untagUsers``                ``{"tag": "Sport", "extIds": [...]}``
``enableMail`` / ``disableMail``             ``{"extIds": [...]}``
``enableSms`` / ``disableSms``               ``{"extIds": [...]}``
``deleteUsersPermanently``                   ``{"extIds": [...]}``
``enablePush`` / ``disablePush``             ``{"extId": "..."}`` (one user per request)
``updateEmail``                              ``{"extId": "...", "email": "..."}`` (one user per request)
``updateMsisdn``                             ``{"extId": "...", "msisdn": "..."}`` (one user per request)
``setProfileAttributes``                     ``[{"extId": "...", "profile": {"k": v}}, ...]``
``unsetProfileAttributes``                   ``[{"extId": "...", "profile": ["k", ...]}, ...]``
``pushProfileAttributes`` / ``pull...``      ``[{"extId": "...", "profile": {"arrKey": [v, ...]}}, ...]``
``setCategoryPreferences``                   ``[{"extId": "...", "category": "...", "enable": bool}, ...]``
``fireEvents``                               ``[{"extId": "...", "name": "...", ...attributes}, ...]``
===========================================  ===================================================

Every multi-user request names at most :data:`sync.platforms.netmera.MAX_IDS_PER_REQUEST` unique external IDs;
array bodies may hold several items for one ID (several categories or events of the same user), which count once.

This is the public face, and the builder module :mod:`sync.planning.planning` registers for Netmera. The implementation
is split by concept: the request shapes (endpoints, phases, bodies, batch IDs, splitting) in :mod:`._shapes`,
the streaming from clean frames to batches (:class:`Stream`, :func:`streams_for`, :func:`snapshot_streams`,
:func:`stream_batches`, :func:`stream_counts`, :func:`stream_sample`) in :mod:`._streams`, which builds each body
as columns (:mod:`sync.platforms._encode`) and cuts batches with :mod:`sync.platforms._batches`: a batch's body is
its canonical JSON ``bytes``, sent as they are. The Python body builders below give the same bytes through
:func:`make_batch` (a test, a cut-down batch). The rows that contradict themselves (a tag added and removed, a
list value pushed and pulled) are refused at plan time by :func:`check_rows` (:mod:`._checks`).
"""

from __future__ import annotations

from sync.platforms.netmera import MAX_IDS_PER_REQUEST
from sync.platforms.netmera._checks import check_rows
from sync.platforms.netmera._shapes import (
    ARRAY_BODY_ENDPOINTS,
    ENDPOINT_FOR,
    SINGLE_USER_ENDPOINTS,
    array_attributes_body,
    batch_id_for,
    canonical_json,
    category_preferences_body,
    derived_batch,
    events_body,
    ext_ids_body,
    ext_ids_in_body,
    make_batch,
    operation_for,
    phase_for,
    set_attributes_body,
    single_user_body,
    split_batch,
    tag_body,
    tag_of,
    unset_attributes_body,
    update_email_body,
    update_msisdn_body,
)

# Not in __all__, but sync.state reads the stream column names through this module: re-exported explicitly.
from sync.platforms.netmera._streams import GROUP as GROUP
from sync.platforms.netmera._streams import ITEM as ITEM
from sync.platforms.netmera._streams import (
    Shape,
    Stream,
    json_value,
    snapshot_streams,
    stream_batches,
    stream_counts,
    stream_sample,
    streams_for,
)
from sync.records import Batch


def batch_group(batch: Batch) -> str:
    """The group of a batch of a snapshot stream (:class:`sync.platforms.base.SnapshotBuilder`): the tag of a
    tag or untag request, ``""`` for any other."""
    return tag_of(batch)


__all__ = [
    "ARRAY_BODY_ENDPOINTS",
    "ENDPOINT_FOR",
    "MAX_IDS_PER_REQUEST",
    "SINGLE_USER_ENDPOINTS",
    "Shape",
    "Stream",
    "array_attributes_body",
    "batch_group",
    "batch_id_for",
    "canonical_json",
    "category_preferences_body",
    "check_rows",
    "derived_batch",
    "events_body",
    "ext_ids_body",
    "ext_ids_in_body",
    "json_value",
    "make_batch",
    "operation_for",
    "phase_for",
    "set_attributes_body",
    "single_user_body",
    "snapshot_streams",
    "split_batch",
    "stream_batches",
    "stream_counts",
    "stream_sample",
    "streams_for",
    "tag_body",
    "tag_of",
    "unset_attributes_body",
    "update_email_body",
    "update_msisdn_body",
]
