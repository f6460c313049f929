"""Netmera as a :class:`sync.platforms.base.Platform`: limits, defaults, builder, client, batch restriction.

The request shapes are in :mod:`.requests` (this object delegates to them); the connector is :mod:`.client`,
imported when a client is asked for, so loading a job does not load aiohttp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sync.config import Job, PlatformLimits, RateBudgetSpec, Source, StarterJob
from sync.errors import JobProblem
from sync.platforms.base import BatchBuilder, PlatformClient
from sync.platforms.netmera import MAX_IDS_PER_REQUEST, PLATFORM
from sync.platforms.netmera import requests as netmera
from sync.records import Batch, Operation, body_json

__all__ = ["NETMERA", "NetmeraPlatform"]


class NetmeraPlatform:
    """Netmera REST API 3.0 (seed 001). Snapshot mode is Netmera's: :mod:`sync.state` diffs its fields."""

    name = PLATFORM
    limits = PlatformLimits(
        max_batch=MAX_IDS_PER_REQUEST,
        default_batch_size=MAX_IDS_PER_REQUEST,
        endpoints=tuple(netmera.ENDPOINT_FOR.values()),
        single_user_endpoints=netmera.SINGLE_USER_ENDPOINTS,
        # Netmera documents no rate limit [D]; 20 requests/s per endpoint is a conservative default that still
        # moves 20,000 users/s through the 1000-ID endpoints. Jobs override per endpoint, or add an account-wide
        # group when their server counts the whole API key.
        default_budgets={"*": RateBudgetSpec(requests=20, period=1.0)},
        starter=StarterJob(
            base_url="https://restapi.netmera.com/rest/3.0/",
            secret_env="NETMERA_API_KEY",
            contact_fields=frozenset({"email", "msisdn"}),
            opt_ins=frozenset({"push", "email", "sms"}),
            tags=True,
            reference="docs/jobs.md",
        ),
    )
    snapshot_mode = True
    non_idempotent = frozenset({Operation.FIRE_EVENTS, Operation.PUSH_ATTRIBUTES})
    sandbox = "sync.sandboxes.netmera"

    def job_problems(self, sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
        del sources  # every source kind and mapping the loader accepts has a Netmera endpoint
        # Netmera takes no platform setting: one written there (a typo, another platform's) was ignored in silence.
        return [
            JobProblem(
                f"destination.extra.{key}",
                "Netmera takes no destination.extra settings (the API key is destination.secret; the app is the "
                "key's): remove it",
            )
            for key in extra
        ]

    def builder(self, job: Job) -> BatchBuilder:
        del job  # Netmera's bodies depend on the sources only (dates are epoch milliseconds already)
        return netmera

    def client(self, job: Job, api_key: str) -> PlatformClient:
        from sync.platforms.netmera.client import NetmeraClient

        return NetmeraClient(
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
        body = body_json(batch)  # a cold path: only the IDs a retry resends
        new_body: Any
        if isinstance(body, list):
            new_body = [item for item in body if str(item["extId"]) in keep]
        elif isinstance(body, Mapping) and "extIds" in body:
            new_body = {**body, "extIds": [x for x in body["extIds"] if x in keep]}
        else:  # one-user bodies name a single ID: kept whole above
            return batch
        return netmera.derived_batch(batch, new_body)


NETMERA = NetmeraPlatform()
"""The registered Netmera platform."""
