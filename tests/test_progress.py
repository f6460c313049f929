"""Run progress: the ETA is counted in requests over a recent window, and both views name the phase, 429s,
refusals and failures (what an on-call engineer looks for first)."""

from __future__ import annotations

import io

import structlog

from sync.platforms.netmera.requests import make_batch, tag_body
from sync.records import (
    Attempt,
    AttemptOutcome,
    Batch,
    BatchResult,
    BatchStatus,
    Operation,
    Phase,
    RejectedId,
)
from sync.report.progress import BarProgress, LogProgress


def _batch(tag: str, n_ids: int, phase: Phase = Phase.CHANGES) -> Batch:
    batch = make_batch(Operation.TAG, tag_body(tag, [f"{tag}-{i}" for i in range(n_ids)]))
    return Batch(batch.batch_id, batch.endpoint, batch.operation, batch.body, batch.ext_ids, phase=phase)


def _ok(batch: Batch) -> BatchResult:
    return BatchResult(batch.batch_id, batch.endpoint, batch.operation, BatchStatus.OK, 1, 200, ok_ids=1)


def test_the_eta_follows_requests_not_ids() -> None:
    """Ten small opt-out batches then ten full tag batches at one request a second: an ID-based ETA would leap
    when the 1000-ID batches start (it did: 0:16 → 2:32 → 0:34); counted in requests it stays steady."""
    now = [0.0]
    with structlog.testing.capture_logs() as logs:
        progress = LogProgress(
            total_ids=10 * 3 + 10 * 1000, total_requests=20, every=1.0, clock=lambda: now[0]
        )
        for i in range(20):
            now[0] = float(i + 1)
            batch = _batch(f"t{i}", 3 if i < 10 else 1000, Phase.OPT_OUT if i < 10 else Phase.CHANGES)
            progress.on_batch_start(batch)
            progress.on_attempt(Attempt(batch.batch_id, batch.endpoint, 1, 3, 0.01, AttemptOutcome.OK, 200))
            progress.on_batch_done(batch, _ok(batch))
    lines = [e for e in logs if e["event"] == "run.progress"]
    etas = [e["eta_seconds"] for e in lines]
    assert etas == [float(20 - n) for n in range(1, 21)]  # one request a second, 20 planned: exact
    assert lines[0]["batches_done"] == 1  # the first answer is logged at once: when sending really began
    assert lines[0]["phase"] == "opt-outs" and lines[-1]["phase"] == "changes"
    assert lines[-1]["requests_per_second"] == 1.0


def test_the_rate_is_the_recent_one() -> None:
    """After a slow start (e.g. a long read), the ETA uses the rate of the last window, not the average."""
    now = [0.0]
    with structlog.testing.capture_logs() as logs:
        progress = LogProgress(
            total_ids=100, total_requests=100, every=1.0, window=10.0, clock=lambda: now[0]
        )
        now[0] = 60.0  # a minute before the first answer
        for i in range(40):
            now[0] += 0.5  # then two requests a second
            batch = _batch(f"r{i}", 1)
            progress.on_batch_done(batch, _ok(batch))
    last = [e for e in logs if e["event"] == "run.progress"][-1]
    assert last["requests_per_second"] == 2.0
    left = 100 - last["batches_done"]
    assert last["eta_seconds"] == left / 2  # at 2/s (the average since the start would say about 2.5× that)


def test_429s_refusals_and_failures_are_counted_and_shown() -> None:
    now = [0.0]
    stream = io.StringIO()
    bar = BarProgress(total_ids=6, total_requests=3, stream=stream, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        log = LogProgress(total_ids=6, total_requests=3, every=0.5, clock=lambda: now[0])
        ok, refused, failed = _batch("a", 2), _batch("b", 2), _batch("c", 2)
        results = [
            _ok(ok),
            BatchResult(
                refused.batch_id,
                refused.endpoint,
                refused.operation,
                BatchStatus.REJECTED,
                1,
                400,
                ok_ids=1,
                rejected=[RejectedId("b-0", "400", "bad")],
            ),
            BatchResult(failed.batch_id, failed.endpoint, failed.operation, BatchStatus.FAILED, 5, 503),
        ]
        for batch, result in zip((ok, refused, failed), results, strict=True):
            now[0] += 1.0
            for view in (bar, log):
                view.on_batch_start(batch)
                view.on_attempt(
                    Attempt(batch.batch_id, batch.endpoint, 1, 2, 0.01, AttemptOutcome.RATE_LIMITED, 429)
                )
                view.on_batch_done(batch, result)
    bar.close()
    text = stream.getvalue()
    assert "3/3 requests" in text and "6/6 IDs" in text
    assert "3 429s" in text and "1 refused" in text and "1 failed" in text and "changes" in text
    last = [e for e in logs if e["event"] == "run.progress"][-1]
    assert (last["rate_limited"], last["ids_refused"], last["batches_failed"]) == (3, 1, 1)
