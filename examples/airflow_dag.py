"""Example Airflow DAG: the nightly CRM → Netmera sync with pushsync (Airflow 3; see docs/operations.md).

Copy it into your DAGs folder and adapt the constants. It relies only on pushsync's exit codes and on
``pushsync run --output json``:

* ``sync_users`` runs the job. Its bash wrapper prints the run summary as *one* JSON line last, so
  ``do_xcom_push`` puts the whole summary into XCom, and turns the exit code into the task's state:
  0 ok and 1 partial → success (the summary says which); 2 bad job/input, 3 aborted, 4 interrupted and
  5 crashed (a bug: never a success) → failed.
  A retry after 2 or 3 fails at once without sending anything (2 sends nothing; 3 stops at the first 401/403);
  after 4 (the worker was stopped) it runs the job again, and batches already confirmed are not resent.
* ``check_summary`` reads that XCom and fails the DAG run when too much was refused or failed.
* ``report`` writes the HTML run report whatever happened (``trigger_rule="all_done"``): the page the person
  on call opens first.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

# Airflow 3 import paths (Airflow 2.x: `from airflow import DAG`, `from airflow.decorators import task`,
# `from airflow.operators.bash import BashOperator`).
from airflow.exceptions import AirflowFailException
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, task

JOB = "/opt/pushsync/jobs/nightly-crm.yaml"  # the job file; its destination.secret.env names NETMERA_API_KEY
WORKDIR = "/var/lib/pushsync/nightly-crm"  # ledger, plan and rejects.csv live here (keep it between runs)
REPORTS = "/var/lib/pushsync/reports"
MAX_REFUSED_SHARE = 0.01  # fail the DAG run when more than 1 % of the IDs were refused or failed

# The wrapper: run, keep the exit code, print the summary compacted to one line (XCom takes the last line),
# then map the exit code to the task's state. Environment: JOB, WORKDIR (set below); NETMERA_API_KEY comes
# from an Airflow connection or secret backend through the worker's environment, never from the DAG file.
SYNC_COMMAND = r"""
set -u
summary="$(pushsync run "$JOB" --workdir "$WORKDIR" --output json --progress none \
    --metrics-textfile "$WORKDIR/metrics/pushsync.prom")"
rc=$?
if [ -n "$summary" ]; then
    printf '%s' "$summary" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))'
else
    echo "{\"exit_code\": $rc, \"exit_status\": \"NO_SUMMARY\"}"
fi
case "$rc" in
    0) exit 0 ;;                                   # OK
    1) echo "partial run: see the report" >&2; exit 0 ;;   # PARTIAL: check_summary decides
    *) exit "$rc" ;;                               # 2 BAD_JOB_OR_INPUT, 3 ABORTED, 4 INTERRUPTED, 5 CRASHED
esac
"""

REPORT_COMMAND = r"""
set -eu
mkdir -p "$REPORTS"
pushsync report latest --workdir "$WORKDIR" -o "$REPORTS/nightly-crm-{{ ds }}.html"
"""

with DAG(
    dag_id="pushsync_nightly_crm",
    description="CRM export → Netmera with pushsync",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one run at a time: two runs of one job must not share the ledger's workdir
    default_args={"owner": "data-eng", "retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["pushsync", "netmera"],
) as dag:
    sync_users = BashOperator(
        task_id="sync_users",
        bash_command=SYNC_COMMAND,
        env={"JOB": JOB, "WORKDIR": WORKDIR},
        append_env=True,  # keep PATH and the secret's variable from the worker's environment
        do_xcom_push=True,
        skip_on_exit_code=None,  # no exit code means "skipped": every non-zero one is a failure
        execution_timeout=timedelta(hours=6),
    )

    @task
    def check_summary(raw: str) -> dict[str, Any]:
        """Fail the DAG run when the platform refused or failed too many IDs; pass the summary on."""
        summary: dict[str, Any] = json.loads(raw)
        totals = summary.get("totals", {})
        sent = totals.get("ids_ok", 0) + totals.get("ids_rejected", 0) + totals.get("ids_failed", 0)
        bad = totals.get("ids_rejected", 0) + totals.get("ids_failed", 0)
        if sent and bad / sent > MAX_REFUSED_SHARE:
            raise AirflowFailException(
                f"run {summary.get('run_id')}: {bad} of {sent} IDs refused or failed "
                f"(more than {MAX_REFUSED_SHARE:.0%}); see the report"
            )
        return summary

    report = BashOperator(
        task_id="report",
        bash_command=REPORT_COMMAND,
        env={"WORKDIR": WORKDIR, "REPORTS": REPORTS},
        append_env=True,
        trigger_rule="all_done",  # the report matters most when the sync failed
    )

    check_summary(sync_users.output)  # XComArg: the summary line sync_users pushed
    sync_users >> report
