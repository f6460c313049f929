"""MeiroClient and the export poller against the Meiro sandbox: tokens, paging, errors, waiting with faults."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest_meiro import MEIRO_PASSWORD, VIEWER_EMAIL, VIEWER_PASSWORD

from sync.config import RetryPolicy
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.meiro import Export, ExportStatus
from sync.platforms.meiro.poller import MemoryRecorder, WaitOutcome, wait_for_export
from sync.platforms.sandboxes._core import FaultSpec, RateLimit
from sync.redact import redact

NID = "983d437d-eac6-423b-beb5-40a619be332f"


def _seed(running: Any, exports: int = 1, **kw: Any) -> None:
    state = running.sandbox.state
    if NID not in state.notifications:
        state.add_notification("Campaign", notification_id=NID)
    for _ in range(exports):
        running.clock.advance(1)
        state.add_export(NID, **kw)


class Seen:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.polls: list[tuple[int, str, int]] = []
        self.retries: list[tuple[int | None, float]] = []

    def on_poll(self, export: Export, poll: int) -> None:
        self.polls.append((poll, str(export.status), export.message_counts.sent))

    def on_retry(self, error: RetryableError, delay: float) -> None:
        self.retries.append((error.status, delay))


async def test_all_exports_are_listed_page_by_page_newest_first(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, exports=45, total=10)
    client = meiro_sandbox.client()
    page = await client.list_exports(NID)
    assert (
        [e.id for e in page.exports] == list(range(45, 25, -1)) and page.limit == 20 and page.offset is None
    )
    ids = [e.id async for e in client.iter_exports(NID, page_size=20)]
    assert ids == list(range(45, 0, -1))  # nothing duplicated or missing
    assert client.logins == 1  # one login for all those calls
    # the first page, then three of 20, 20 and 5, and the empty page that shows nothing more follows
    assert meiro_sandbox.sandbox.stats.requests("listExports", 200) == 5


async def test_the_token_is_refreshed_before_it_expires(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    client = meiro_sandbox.client(refresh_margin=600)
    await client.get_export(NID, 1)
    first_expiry = client.token_expires_at
    assert first_expiry == meiro_sandbox.clock() + 8 * 3600
    meiro_sandbox.clock.advance(8 * 3600 - 599)  # inside the refresh margin, not yet expired
    await client.get_export(NID, 1)
    assert (client.logins, client.refreshes) == (1, 1)
    assert client.token_expires_at > first_expiry
    assert meiro_sandbox.sandbox.stats.requests("refresh", 200) == 1


async def test_an_expired_or_revoked_token_means_a_new_login(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    client = meiro_sandbox.client()
    await client.get_export(NID, 1)
    meiro_sandbox.clock.advance(9 * 3600)  # expired: a refresh would be refused, so log in
    await client.get_export(NID, 1)
    assert (client.logins, client.refreshes) == (2, 0)
    meiro_sandbox.sandbox.revoke_tokens()  # the server forgot it: 401, log in again, repeat the call
    export = await client.get_export(NID, 1)
    assert export.id == 1 and client.logins == 3
    assert meiro_sandbox.sandbox.stats.requests("getExport", 401) == 1


async def test_bad_credentials_are_fatal_and_the_password_never_shows(meiro_sandbox: Any) -> None:
    wrong = "wrong-password-987654"
    client = meiro_sandbox.client(password=wrong)
    with pytest.raises(FatalPlatformError) as info:
        await client.list_trash()
    message = str(info.value)
    assert info.value.status == 401 and "e-mail and password" in message
    assert wrong not in message and wrong not in redact(f"{info.value!r} {client._credentials!r}")
    assert MEIRO_PASSWORD not in repr(meiro_sandbox.client()._credentials)


async def test_a_missing_feature_is_fatal_and_named(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    client = meiro_sandbox.client(VIEWER_EMAIL, VIEWER_PASSWORD)
    assert (await client.get_export(NID, 1)).status is ExportStatus.RUNNING
    with pytest.raises(FatalPlatformError) as info:
        await client.cancel_export(NID, 1)
    assert info.value.status == 403 and "push_notifications/edit" in str(info.value)


async def test_cancel_running_export_and_refuse_finished_one_clearly(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    meiro_sandbox.sandbox.state.add_export(NID, status="finished")
    client = meiro_sandbox.client()
    canceled = await client.cancel_export(NID, 1)
    assert canceled.status is ExportStatus.CANCELED and "canceled" in canceled.statuses_history
    with pytest.raises(RejectedBatchError) as info:
        await client.cancel_export(NID, 2)
    assert str(info.value).startswith(
        f"export 2 of push notification {NID} is already finished; it cannot be canceled"
    )
    assert info.value.code == "export_finished" and info.value.status == 400
    with pytest.raises(FatalPlatformError) as missing:
        await client.get_export(NID, 99)
    assert missing.value.status == 404
    assert (
        str(missing.value)
        == f"export 99 of push notification {NID} was not found: Push notification export not found"
    )


async def test_5xx_and_429_are_retryable_with_retry_after(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    client = meiro_sandbox.client()
    await client.login()
    meiro_sandbox.sandbox.configure(faults=FaultSpec(error_503=1.0))
    with pytest.raises(RetryableError) as info:
        await client.get_export(NID, 1)
    assert info.value.status == 503
    meiro_sandbox.sandbox.configure(faults=FaultSpec(), limits={"getExport": RateLimit(0, 30)})
    with pytest.raises(RetryableError) as limited:
        await client.get_export(NID, 1)
    assert (
        limited.value.rate_limited
        and limited.value.retry_after is not None
        and 0 < limited.value.retry_after <= 30
    )


async def test_trash_search_and_restore(meiro_sandbox: Any) -> None:
    state = meiro_sandbox.sandbox.state
    for i in range(30):
        meiro_sandbox.clock.advance(1)
        state.add_notification(f"Black Friday {i}" if i % 3 == 0 else f"Other {i}", trashed=True)
    client = meiro_sandbox.client()
    found = [n.name async for n in client.iter_trash(searched_text="black friday", page_size=4)]
    assert found == [f"Black Friday {i}" for i in range(27, -1, -3)]
    page = await client.list_trash(limit=3, searched_text="other")
    assert page.searched_text == "other" and page.limit == 3 and len(page.items) == 3
    restored = await client.restore(page.items[0].id)
    assert restored.name == "Other 29" and not state.notifications[restored.id].trashed
    with pytest.raises(FatalPlatformError) as info:
        await client.restore(restored.id)
    assert info.value.status == 404 and "is not in the trash" in str(info.value)


async def test_wait_reports_progress_until_finished(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(waiting=2, running=4)
    _seed(running, total=123, excluded_invalid=3, excluded_by_frequency_cap=20)
    seen = Seen()
    wait = await wait_for_export(
        running.client(),
        NID,
        1,
        interval=5,
        progress=seen,
        clock=running.clock,
        wall_clock=running.clock,
        sleep=running.clock.sleep,
    )
    assert wait.outcome is WaitOutcome.FINISHED and wait.status is ExportStatus.FINISHED
    assert seen.polls == [
        (1, "waiting", 0),
        (2, "running", 0),
        (3, "running", 25),
        (4, "running", 50),
        (5, "running", 75),
        (6, "finished", 100),
    ]
    assert wait.message_counts.to_dict() == {
        "total": 123,
        "sent": 100,
        "excluded_invalid": 3,
        "excluded_by_frequency_cap": 20,
    }
    assert (wait.polls, wait.retries) == (6, 0)
    assert running.clock.slept == [5.0] * 5 and wait.finished_at - wait.started_at == 25


async def test_wait_survives_faults_and_rate_limits(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(
        waiting=3,
        running=10,
        faults={"error_500": 0.2, "error_503": 0.1, "drop": 0.05},
        seed=3,
        limits={"getExport": {"requests": 4, "window": 60}},
    )
    _seed(running, total=1000, excluded_invalid=10)
    seen = Seen()
    recorder = MemoryRecorder()
    wait = await wait_for_export(
        running.client(),
        NID,
        1,
        interval=2,
        retry=RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=8),
        progress=seen,
        clock=running.clock,
        wall_clock=running.clock,
        sleep=running.clock.sleep,
        rng=random.Random(1),
    )
    recorder.record_export_wait("run-1", wait)
    assert wait.outcome is WaitOutcome.FINISHED and wait.message_counts.sent == 990
    assert wait.retries == len(seen.retries) > 0
    statuses = {status for status, _ in seen.retries}
    assert 429 in statuses and statuses & {500, 503}
    # every 429 waited at least until the window reopened
    stats = running.sandbox.stats
    assert stats.max_in_window("getExport") <= 4 and stats.rate_limited("getExport") >= 1
    assert wait.polls == 13 == stats.requests("getExport", 200)
    assert [p for p, _, _ in seen.polls] == list(range(1, 14))
    assert recorder.waits == [("run-1", wait)]


async def test_wait_ends_on_error_and_canceled_and_times_out(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, total=40, outcome="error")
    _seed(meiro_sandbox, total=40)
    _seed(meiro_sandbox, total=40, waiting=1000)
    client = meiro_sandbox.client()
    kw: dict[str, Any] = {
        "clock": meiro_sandbox.clock,
        "wall_clock": meiro_sandbox.clock,
        "sleep": meiro_sandbox.clock.sleep,
    }
    error = await wait_for_export(client, NID, 1, interval=1, **kw)
    assert error.outcome is WaitOutcome.ERROR and error.message_counts.sent == 20
    await client.cancel_export(NID, 2)
    canceled = await wait_for_export(client, NID, 2, interval=1, **kw)
    assert canceled.outcome is WaitOutcome.CANCELED and canceled.polls == 1
    timed_out = await wait_for_export(client, NID, 3, interval=10, max_wait=35, **kw)
    assert timed_out.outcome is WaitOutcome.TIMED_OUT and timed_out.status is ExportStatus.WAITING
    assert timed_out.polls == 4 and timed_out.finished_at - timed_out.started_at == 35


async def test_wait_gives_up_after_max_attempts_failures_in_a_row(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    client = meiro_sandbox.client()
    await client.login()
    meiro_sandbox.sandbox.configure(faults=FaultSpec(error_500=1.0, endpoints=frozenset({"getExport"})))
    seen = Seen()
    with pytest.raises(RetryableError) as info:
        await wait_for_export(
            client,
            NID,
            1,
            retry=RetryPolicy(max_attempts=4, base_delay=1, max_delay=4),
            progress=seen,
            clock=meiro_sandbox.clock,
            sleep=meiro_sandbox.clock.sleep,
            rng=random.Random(0),
        )
    assert info.value.status == 500 and len(seen.retries) == 3
    assert all(0 <= d <= 4 for d in meiro_sandbox.clock.slept)


async def test_a_missing_export_ends_the_wait_at_once(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    with pytest.raises(FatalPlatformError):
        await wait_for_export(
            meiro_sandbox.client(), NID, 42, sleep=meiro_sandbox.clock.sleep, clock=meiro_sandbox.clock
        )
    assert meiro_sandbox.clock.slept == []


def test_the_meiro_package_surface_is_pinned() -> None:
    import sync.platforms.meiro as meiro

    assert sorted(meiro.__all__) == [
        "EDIT_FEATURE",
        "Export",
        "ExportPage",
        "ExportStatus",
        "MessageCounts",
        "PLATFORM",
        "TERMINAL_STATUSES",
        "TOKEN_TTL",
        "TrashPage",
        "TrashedNotification",
        "VIEW_FEATURE",
    ]
    assert all(hasattr(meiro, name) for name in meiro.__all__)
    assert {s for s in ExportStatus if s.terminal} == {
        ExportStatus.FINISHED,
        ExportStatus.ERROR,
        ExportStatus.CANCELED,
    }


async def test_an_export_created_while_paging_is_not_listed_twice(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, exports=25)
    client = meiro_sandbox.client()
    ids = []
    async for export in client.iter_exports(NID, page_size=10):
        ids.append(export.id)
        if len(ids) == 10:  # between the first and the second page, a new export appears at the top
            _seed(meiro_sandbox)
    assert ids == list(range(25, 0, -1))  # the old ones, each once (the newcomer started after the listing)


async def test_a_wait_longer_than_a_token_refreshes_it_in_time(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(waiting=2, running=10)
    _seed(running, total=10)
    client = running.client(refresh_margin=900)
    wait = await wait_for_export(
        client,
        NID,
        1,
        interval=3600,
        clock=running.clock,
        wall_clock=running.clock,
        sleep=running.clock.sleep,
    )
    assert wait.outcome is WaitOutcome.FINISHED and wait.finished_at - wait.started_at == 11 * 3600
    assert client.logins == 1 and client.refreshes == 1  # refreshed before 8 h, never refused
    assert running.sandbox.stats.requests("getExport", 401) == 0
