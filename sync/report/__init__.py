"""What a run tells people and schedulers: the summary, the HTML report, metrics, progress and alerts.

Modules: ``summary``, ``report``, ``_report_data``, ``_report_html``, ``metrics``, ``progress``, ``alerts``.

The names below are the stage's public face, imported on first use; code inside sync/ imports
the modules themselves.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.report.alerts import alert_reasons, post_alert, resolve_webhook
    from sync.report.metrics import RunMetrics
    from sync.report.progress import make_progress
    from sync.report.report import write_report
    from sync.report.summary import RunInput, RunSummary, summarise

_HOME = {
    "RunInput": "sync.report.summary",
    "RunMetrics": "sync.report.metrics",
    "RunSummary": "sync.report.summary",
    "alert_reasons": "sync.report.alerts",
    "make_progress": "sync.report.progress",
    "post_alert": "sync.report.alerts",
    "resolve_webhook": "sync.report.alerts",
    "summarise": "sync.report.summary",
    "write_report": "sync.report.report",
}

__all__ = [
    "RunInput",
    "RunMetrics",
    "RunSummary",
    "alert_reasons",
    "make_progress",
    "post_alert",
    "resolve_webhook",
    "summarise",
    "write_report",
]


def __getattr__(name: str) -> object:
    """A face name, imported from its module when first asked for."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
