"""Alerts: one Slack-compatible webhook post (``{"text": ...}``) when a run needs a person.

A run alerts when it failed (exit 2 and above; exit 1 too with ``on_partial``) — also when it ended with an
error before or instead of its summary (an input file missing, a crash: :func:`post_failure_alert`), when rejected rows and refused IDs
exceed ``max_rejected_share``, or when it took more than ``slower_than_usual`` times the median duration of the
job's last successful runs in the ledger. The webhook URL is a credential (anyone holding it may post): the job
names where it lives, the CLI resolves it, and it is registered as a secret so that no log line shows it.

Posting never fails or slows the run beyond ``timeout``: any error is a ``alert.failed`` warning.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from sync.config import Alerts, Destination, resolve_secret
from sync.errors import ExitCode, PushSyncError, SecretError
from sync.logs import get_logger
from sync.redact import redact, register_url
from sync.report.summary import RunSummary

__all__ = ["alert_reasons", "post_alert", "post_failure_alert", "resolve_webhook"]

_MIN_HISTORY = 3  # successful runs needed before "slower than usual" means anything
_HISTORY = 10  # the last successful runs the median is taken over


def resolve_webhook(alerts: Alerts, environ: Mapping[str, str] | None = None) -> str:
    """The webhook URL from the environment variable or file the job names (registered as a secret).
    Raises :class:`SecretError` naming the variable or file, never the value."""
    try:
        url = resolve_secret(
            Destination(
                platform="alerts", base_url="", secret_env=alerts.webhook_env, secret_file=alerts.webhook_file
            ),
            environ,
        )
    except SecretError as exc:
        raise SecretError(f"alerts.webhook: {exc}") from None
    # Checked here, before anything is sent: a port that is no number made the post raise http.client.InvalidURL,
    # a crash (exit 5) at the end of a run that had gone through. The message never repeats the URL.
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host, _ = parts.hostname, parts.port
    except ValueError as exc:
        raise SecretError(f"alerts.webhook: not a usable URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise SecretError("alerts.webhook: must be an http:// or https:// URL with a host")
    # The whole URL where it appears whole; in pieces only its key (the long path segments, credential
    # parameters): registered in pieces, every platform answer saying "https://" or the webhook's host lost it.
    register_url(url, secret_path=True)
    return url


def alert_reasons(alerts: Alerts, summary: RunSummary, usual_durations: Sequence[float]) -> list[str]:
    """Why this run needs a person (empty: it does not). ``usual_durations``: seconds of the job's last
    successful runs, newest first, this run excluded."""
    reasons = []
    code = summary.exit_code
    if code >= ExitCode.BAD_JOB_OR_INPUT or (code is ExitCode.PARTIAL and alerts.on_partial):
        reasons.append(
            f"exit {int(code)} ({code.name})" + (f": {summary.message}" if summary.message else "")
        )
    if alerts.max_rejected_share is not None:
        bad = summary.rows_rejected + summary.ids_rejected
        of = (summary.rows_read or 0) + summary.ids_ok + summary.ids_rejected
        if of and bad / of > alerts.max_rejected_share:
            reasons.append(
                f"{bad} rejected rows and refused IDs of {of} ({bad / of:.2%}), over "
                f"alerts.max_rejected_share ({alerts.max_rejected_share:.2%})"
            )
    recent = list(usual_durations[:_HISTORY])
    if len(recent) >= _MIN_HISTORY:
        usual = statistics.median(recent)
        if usual > 0 and summary.elapsed > alerts.slower_than_usual * usual:
            reasons.append(
                f"took {summary.elapsed:.1f} s, {summary.elapsed / usual:.1f}x the median {usual:.1f} s of the "
                f"last {len(recent)} successful runs"
            )
    return reasons


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: urllib turns a POST answered 301/302/303 into a GET without the body, so the alert
    was lost while the log said ``alert.sent``; the 3xx is now an ``alert.failed`` (set the webhook's final URL)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # urllib then raises HTTPError for the 3xx itself


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with _OPENER.open(request, timeout=timeout) as resp:
        return int(resp.status)


async def post_alert(url: str, summary: RunSummary, reasons: Sequence[str], *, within: float) -> bool:
    """Post ``{"text": ...}`` naming the job, the run and ``reasons``; True when the webhook took it. Never
    raises (but for cancellation) and never waits much longer than ``within`` seconds."""
    text = (
        f"pushsync job {summary.job}, run {summary.run_id}: " + "; ".join(reasons) + f". {summary.requests} "
        f"requests, {summary.ids_ok} IDs ok, {summary.ids_rejected} refused, {summary.ids_failed} failed, "
        f"{summary.rows_rejected} input rows rejected, {summary.elapsed:.1f} s."
    )
    log = get_logger(job=summary.job, run=summary.run_id)
    return await _deliver(url, text, within, log, reasons=len(reasons))


async def post_failure_alert(url: str, job: str, error: BaseException, *, within: float) -> bool:
    """Post the alert of a run that ended with an error instead of a summary (a missing or unusable input file:
    exit 2; a local failure after sending began: exit 3; an interruption before sending: exit 4; a crash:
    exit 5). Never raises (but for cancellation); bounded by ``within`` as :func:`post_alert` is."""
    code = error.exit_code if isinstance(error, PushSyncError) else ExitCode.CRASHED
    said = str(error) or type(error).__name__
    if code is ExitCode.CRASHED:
        said = f"{type(error).__name__}: {said}"
    text = f"pushsync job {job}: exit {int(code)} ({code.name}): {said}"
    return await _deliver(url, text, within, get_logger(job=job), reasons=1)


def _slack_text(text: str) -> str:
    """``text`` with Slack's three control characters escaped (``&``, ``<``, ``>``, as Slack's formatting guide
    asks of text that is not markup): what an alert quotes — a platform's error message, a file path, an ID —
    read as markup otherwise, so ``<!channel>`` in it notified the whole channel and ``<http://x|y>`` showed
    a link it did not say."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def _deliver(url: str, text: str, within: float, log: Any, *, reasons: int) -> bool:
    body = json.dumps({"text": _slack_text(redact(text))}).encode("utf-8")
    try:
        # The thread's socket honours ``within``; the outer guard keeps a stuck DNS lookup from holding the run.
        async with asyncio.timeout(within + 1):
            status = await asyncio.to_thread(_post, url, body, within)
    except (OSError, TimeoutError, ValueError, http.client.HTTPException) as exc:
        # The message may quote the URL (a credential): masked, as every registered secret.
        log.warning("alert.failed", error=redact(f"{type(exc).__name__}: {exc}"))
        return False
    log.info("alert.sent", status=status, reasons=reasons)
    return True
