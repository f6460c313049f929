"""The plan preview of a snapshot run (``pushsync plan``): what its diff would send; nothing is kept."""

from __future__ import annotations

from typing import Any, NamedTuple

from sync.config import SnapshotSettings
from sync.state._delta import compute_diff, rejected_users, snapshot_builder_for, snapshot_streams
from sync.state._diff import DiffCounts
from sync.state._store import StateStore


class Preview(NamedTuple):
    """What :func:`preview` found: the diff's counts over every source, the requests, and the sources whose
    removals a run would refuse (the threshold is per source: summed counts cannot say)."""

    counts: DiffCounts
    summary: Any
    refused: tuple[str, ...]


def preview(
    store: StateStore,
    plan: Any,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    force: bool = False,
    assumed_latency: float | None = None,
) -> Preview:
    """What a snapshot run of ``plan`` (a :class:`sync.planning.planning.Plan`) would send, for ``pushsync plan``:
    the diff counts, a :class:`sync.planning.planning.PlanSummary` of the delta's requests and the sources whose
    removals a run would refuse. Writes nothing lasting (the delta goes into the plan's staging directory, removed
    before returning); never refuses on the removal threshold (the counts and ``refused`` show it). Users whose rows were rejected are held as a run would hold them
    (``force``: as ``run --force`` would)."""
    import secrets

    from sync.planning.planning import ASSUMED_LATENCY, EndpointSummary, PlanSummary, estimate_duration

    latency = ASSUMED_LATENCY if assumed_latency is None else assumed_latency
    job = plan.job
    builder = snapshot_builder_for(job)
    run_id = f"preview-{secrets.token_hex(4)}"
    diff = compute_diff(
        store,
        plan.staged,
        run_id,
        settings,
        full_refresh=full_refresh,
        force=force,
        batch_size=job.batch_sizes,
        rejected=rejected_users(plan.rejects_path, plan.staged),
        refuse=False,
        # In the plan's own staging directory (locked while the plan lives, removed with it or by the next plan
        # after a kill), not in pending/: a run's recovery must never take a preview for a crashed run.
        directory=plan.staging_dir / run_id,
        builder=builder,
    )
    try:
        counts = diff.request_counts()
        samples: dict[str, Any] = {}
        for delta in diff.sources:
            for stream in snapshot_streams(delta.source, builder):
                if stream.endpoint not in samples:
                    sample = builder.stream_sample(stream, delta.frames())
                    if sample is not None:
                        samples[stream.endpoint] = sample
        durations = estimate_duration({k: v[0] for k, v in counts.items()}, job.dispatch, latency=latency)
        summary = PlanSummary(
            job=job.name,
            platform=job.destination.platform,
            base_url=job.destination.base_url,
            endpoints=tuple(
                EndpointSummary(ph, ep, op, n, ids, durations.get((ph, ep, op), 0.0))
                for (ph, ep, op), (n, ids) in counts.items()
            ),
            rows_read=sum(s.rows_read for s in plan.staged),
            rows_clean=sum(s.rows_clean for s in plan.staged),
            rejected_count=plan.rejected_count,
            rejects_path=str(plan.rejects_path),
            duplicates_dropped=sum(s.duplicates_dropped for s in plan.staged),
            estimated_seconds=durations.get(None, 0.0),
            samples=samples,
            sources={
                s.source.name: {"files": len(s.files), "rows_read": s.rows_read, "rows_clean": s.rows_clean}
                for s in plan.staged
            },
        )
        return Preview(diff.counts, summary, diff.refused_sources)
    finally:
        diff.discard()
