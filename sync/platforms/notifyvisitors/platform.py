"""NotifyVisitors as a :class:`sync.platforms.base.Platform`: limits, defaults, builder, client, batch restriction.

The request shapes and job checks are in :mod:`.requests` (this object delegates to them); the connector is
:mod:`.client`, imported when a client is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sync.config import BudgetGroupSpec, Job, PlatformLimits, RateBudgetSpec, Source, StarterJob
from sync.errors import JobProblem
from sync.platforms.base import BatchBuilder, PlatformClient
from sync.platforms.notifyvisitors import (
    EVENT_CREATE,
    FAMILY_OF,
    MAX_EVENTS_PER_REQUEST,
    PLATFORM,
    RATE_LIMITS_PER_MINUTE,
    USER_CREATE,
)
from sync.platforms.notifyvisitors import requests as nv
from sync.records import Batch, Operation, body_json

__all__ = ["NOTIFYVISITORS", "NotifyVisitorsPlatform"]


class NotifyVisitorsPlatform:
    """NotifyVisitors REST API v1 (seed 004): ``user/create`` and ``event/create``.

    No snapshot mode: ``user/create`` only sets attributes (nothing can be unset, untagged or removed), so a
    diff against a confirmed state could not send what left the export; jobs send changes.
    """

    name = PLATFORM
    limits = PlatformLimits(
        account_settings=frozenset({"brand_id"}),  # the account at the base URL, with the key
        max_batch=MAX_EVENTS_PER_REQUEST,  # user/create batches are capped at 100 users by the builder
        default_batch_size=MAX_EVENTS_PER_REQUEST,
        endpoints=(USER_CREATE, EVENT_CREATE),
        # NotifyVisitors documents its limits per API family (User API 100/min, Event API 500/min), shared by
        # every endpoint of the family: budget groups.
        default_budget_groups=tuple(
            BudgetGroupSpec(
                family,
                RateBudgetSpec(requests=RATE_LIMITS_PER_MINUTE[family], period=60.0),
                tuple(endpoint for endpoint, f in FAMILY_OF.items() if f == family),
            )
            for family in dict.fromkeys(FAMILY_OF.values())
        ),
        # The brand ID is the account's, named by no file header: init takes it as --extra brand_id=... (the
        # loader asks for it with api_key authentication, the default).
        starter=StarterJob(
            base_url="https://analytics.notifyvisitors.com/api/v1/",
            secret_env="NOTIFYVISITORS_API_KEY",
            contact_fields=frozenset({"email", "msisdn"}),
            opt_ins=frozenset({"email", "sms"}),
            filled_by={
                "email": "email",
                "mobile": "msisdn",
                "email_opt_in": "opt_ins.email",
                "sms_opt_in": "opt_ins.sms",
            },
            extra_hints=(
                "auth: api_key            # api_key: x-api-key + x-brand-id; bearer: Authorization: Bearer",
                "event_time_zone: UTC     # default: validation.timezone",
            ),
            reference="docs/notifyvisitors.md",
        ),
    )
    snapshot_mode = False
    non_idempotent = frozenset({Operation.FIRE_EVENTS})
    sandbox = "sync.sandboxes.notifyvisitors"

    def job_problems(self, sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
        return nv.job_problems(sources, extra)

    def builder(self, job: Job) -> BatchBuilder:
        return nv.for_job(job)

    def client(self, job: Job, api_key: str) -> PlatformClient:
        from sync.platforms.notifyvisitors.client import NotifyVisitorsClient

        return NotifyVisitorsClient(
            job.destination,
            api_key,
            timeout=job.dispatch.request_timeout,
            max_connections=max(job.dispatch.concurrency, 1),
        )

    def restrict(self, batch: Batch, ext_ids: Iterable[str]) -> Batch | None:
        keep = frozenset(ext_ids) & frozenset(batch.ext_ids)
        if not keep:
            return None
        if keep == frozenset(batch.ext_ids):
            return batch
        # Every item of a kept user stays, in order (events of one user keep their order), with its own row and
        # row key, and the batch keeps its place behind its predecessor, as the platform's split_batch does. A
        # cold path (pushsync retry): the body is decoded.
        items = body_json(batch)["nv"]
        rows = nv.item_rows(batch, items)
        kept = [i for i, item in enumerate(items) if str(item["userID"]) in keep]
        keyed = len(batch.row_keys) == 8 * len(items)
        return nv.make_batch(
            batch.endpoint,
            {"nv": [items[i] for i in kept]},
            rows=[rows[i] for i in kept],
            after=batch.after,
            row_keys=b"".join(batch.row_keys[8 * i : 8 * i + 8] for i in kept) if keyed else b"",
        )


NOTIFYVISITORS = NotifyVisitorsPlatform()
"""The registered NotifyVisitors platform."""
