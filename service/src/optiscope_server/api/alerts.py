"""``/api/v1/alerts`` and ``/api/v1/runs/{id}/alerts``: alerts with their evidence, filtered and
paged, and acknowledging one."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from optiscope import wire

from ..collector import Collector
from ..storage import NotFound
from . import schemas as m
from .deps import INT32, Admin, CollectorDep, Read, RunId, body_schema, own_project, parse, remote, visible
from .errors import ERRORS

router = APIRouter(prefix="/api/v1", tags=["alerts"], responses=ERRORS)

Before = Annotated[
    int | None, Query(ge=1, le=INT32, description="next_cursor of the previous page (alerts older than that)")
]
Limit = Annotated[int, Query(ge=1, le=10_000)]
State = Literal["firing", "resolved"] | None


def alert_list(collector: Collector, rows: list[dict], limit: int) -> m.AlertList:
    return m.AlertList(
        alerts=[m.alert_out(a, collector.settings.run_url(a["run_id"])) for a in rows],
        next_cursor=str(rows[-1]["id"]) if len(rows) == limit else None,
    )


@router.get("/runs/{run_id}/alerts", response_model=m.AlertList)
def run_alerts(
    run_id: RunId,
    who: Read,
    collector: CollectorDep,
    state: State = None,
    acknowledged: bool | None = None,
    limit: Limit = 1000,
    cursor: Before = None,
) -> m.AlertList:
    """The run's alerts, newest first."""
    visible(collector, who, run_id)
    rows = collector.alerts.list_alerts(run_id, state, limit, acknowledged=acknowledged, before=cursor)
    return alert_list(collector, rows, limit)


@router.get("/alerts", response_model=m.AlertList)
def all_alerts(
    who: Read,
    collector: CollectorDep,
    state: State = None,
    project: Annotated[str | None, Query(max_length=wire.MAX_NAME_LEN)] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    severity: Annotated[str | None, Query(max_length=16)] = None,
    acknowledged: bool | None = None,
    limit: Limit = 1000,
    cursor: Before = None,
) -> m.AlertList:
    """Alerts of every run the caller can see, newest first, filtered."""
    project = own_project(who, project)
    rows = collector.alerts.list_alerts(
        None, state, limit, project=project, rule=rule, severity=severity, acknowledged=acknowledged, before=cursor
    )
    return alert_list(collector, rows, limit)


@router.post("/alerts/{alert_id}/acknowledge", response_model=m.AlertOut, openapi_extra=body_schema(m.AckIn))
async def acknowledge(
    request: Request, alert_id: Annotated[int, Path(ge=1, le=INT32)], who: Admin, collector: CollectorDep
) -> m.AlertOut:
    """Acknowledge an alert: someone owns it now. Idempotent; recorded in the audit log."""
    body = await parse(request, m.AckIn, collector.settings.max_body_bytes)
    row = await run_in_threadpool(collector.alerts.get_alert, alert_id)
    if not who.sees(row["project"]):
        raise NotFound(f"alert {alert_id}")
    row = await run_in_threadpool(collector.alerts.acknowledge, alert_id, who.actor, body.note, remote(request))
    return m.alert_out(row, collector.settings.run_url(row["run_id"]))
