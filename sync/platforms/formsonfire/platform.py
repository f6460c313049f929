"""Forms On Fire as a :class:`sync.platforms.base.Platform`: limits, defaults, builder, client.

The push bodies and job checks are in :mod:`.requests` (this object delegates to them); the connector is
:mod:`.client`, imported when a client is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sync.config import Job, PlatformLimits, RateBudgetSpec, Source, StarterField, StarterJob
from sync.errors import JobProblem
from sync.platforms.base import BatchBuilder, PlatformClient
from sync.platforms.formsonfire import ENDPOINT, PLATFORM
from sync.platforms.formsonfire import requests as fof
from sync.records import Batch, Operation

__all__ = ["FORMSONFIRE", "FormsOnFirePlatform"]


class FormsOnFirePlatform:
    """Forms On Fire "POST Push API" (seed 003): one push to one user per request.

    No snapshot mode: a push is a message, not a state — there is nothing to diff.
    """

    name = PLATFORM
    limits = PlatformLimits(
        account_settings=frozenset({"company_id"}),  # the account at the base URL, with the key
        max_batch=1,
        default_batch_size=1,
        endpoints=(ENDPOINT,),
        single_user_endpoints=frozenset({ENDPOINT}),
        # No documented limit; 10 requests/s is an assumption [I].
        default_budgets={"*": RateBudgetSpec(requests=10, period=1.0)},
        # Each account has its node's address and its CompanyId, which no file header names: init takes them as
        # --base-url and --extra company_id=... . A row is a push: only the message fields are mapped.
        starter=StarterJob(
            base_url=None,
            secret_env="FORMSONFIRE_INTEGRATION_KEY",
            fields=(
                StarterField("Title", "string", ("title", "subject", "headline")),
                StarterField("Body", "string", ("body", "message", "text", "content")),
                StarterField("Sound", "boolean", ("sound",)),
                StarterField("ExpirySecs", "number", ("expiry_secs", "expirysecs", "expiry", "ttl")),
            ),
            extra_hints=(
                "user_key: UserExternalId   # what the ID column holds: UserId, UserEmail or UserExternalId",
                'title: "..."               # a constant for rows whose Title is empty (also body, sound, expiry_secs)',
                "body_format: json          # or xml",
            ),
            reference="docs/formsonfire.md",
        ),
    )
    snapshot_mode = False
    non_idempotent = frozenset({Operation.SEND_PUSH})
    sandbox = "sync.sandboxes.formsonfire"

    def job_problems(self, sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
        return fof.job_problems(sources, extra)

    def builder(self, job: Job) -> BatchBuilder:
        return fof.for_job(job)

    def client(self, job: Job, api_key: str) -> PlatformClient:
        from sync.platforms.formsonfire.client import FormsOnFireClient

        return FormsOnFireClient(
            job.destination,
            api_key,
            timeout=job.dispatch.request_timeout,
            max_connections=max(job.dispatch.concurrency, 1),
        )

    def restrict(self, batch: Batch, ext_ids: Iterable[str]) -> Batch | None:
        # One push names one user: it is kept whole or not at all.
        return batch if set(batch.ext_ids) & set(ext_ids) else None


FORMSONFIRE = FormsOnFirePlatform()
"""The registered Forms On Fire platform."""
