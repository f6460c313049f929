"""Batch-ID compatibility of the columnar NotifyVisitors and Forms On Fire builders (issue 13): on the fixtures of
``nvfof_compat``, every batch — its ID, endpoint, phase, IDs, ``after``, item rows and row keys, and for Forms On
Fire in XML mode the request bytes as sent — equals what the row-by-row builders gave before the rewrite
(``tests/fixtures/nvfof_batch_ids.json``, recorded with them). A run planned by an older version resumes with the
same batch IDs.

The NotifyVisitors inputs hold values the platform refuses, which the plan now rejects
(``Builder.check_rows``): the recorded batches are the builder's own, planned without that check; that the
check takes out exactly the refused items and leaves the others byte for byte is
``tests/platforms/test_notifyvisitors_checks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nvfof_compat as compat
import pytest

from sync.config import load_job
from sync.planning.planning import build_plan
from sync.platforms.formsonfire import BodyFormat
from sync.platforms.formsonfire.requests import RequestWriter
from sync.platforms.notifyvisitors.requests import Builder

RECORDED = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "nvfof_batch_ids.json").read_text(encoding="utf-8")
)


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NV_COMPAT_KEY", "k")
    monkeypatch.setenv("FOF_COMPAT_KEY", compat.INTEGRATION_KEY)


@pytest.mark.parametrize("variant", list(compat.NV_VARIANTS))
def test_notifyvisitors_batches_keep_the_recorded_ids(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(
        Builder, "check_rows"
    )  # the builder alone: values the platform refuses sent as they are
    job = load_job(compat.write_nv_inputs(compat.compat_dir(variant), variant))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        assert compat.fingerprints(plan.batches()) == RECORDED[variant]


@pytest.mark.parametrize("variant", list(compat.FOF_VARIANTS))
def test_formsonfire_batches_keep_the_recorded_ids_and_xml_requests(variant: str) -> None:
    job = load_job(compat.write_fof_inputs(compat.compat_dir(variant), variant))
    xml = compat.FOF_VARIANTS[variant]["body_format"] == "xml"
    writer = RequestWriter(BodyFormat.XML, compat.COMPANY_ID, compat.INTEGRATION_KEY)
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        batches = list(plan.batches())
        wire = {b.batch_id: writer.payload(b.body) for b in batches} if xml else None
        assert compat.fingerprints(batches, wire) == RECORDED[variant]
