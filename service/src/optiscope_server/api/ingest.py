"""``/api/v1/runs/{id}`` for trainers: register a run (or a rank), send batches, heartbeat, finish."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from optiscope import wire

from ..storage import NotFound, Rejected
from . import schemas as m
from .deps import CollectorDep, Ingest, RunId, body_schema, parse, visible
from .errors import ERRORS, ApiError
from .params import read_body

router = APIRouter(prefix="/api/v1/runs", tags=["ingest"], responses=ERRORS)

#: Wire reasons for a body that cannot be parsed at all (400); every other wire reason is 422.
UNPARSEABLE = frozenset({"malformed_json", "truncated", "trailing_bytes"})


@router.put("/{run_id}", response_model=m.RunOut, openapi_extra=body_schema(m.RunIn))
async def register_run(request: Request, run_id: RunId, who: Ingest, collector: CollectorDep) -> m.RunOut:
    """Register a run, or one rank of it (idempotent; the SDK does it)."""
    body = await parse(request, m.RunIn, collector.settings.max_body_bytes)
    if not who.sees(body.project):
        raise ApiError(403, "project_not_allowed", f"this token cannot register runs in project {body.project!r}")
    if who.project is not None:  # a run of another project is not found, rather than a 409 that tells it exists
        owner = await run_in_threadpool(collector.runs.run_project, run_id)
        if owner is not None and owner != who.project:
            raise NotFound(run_id)
    try:
        row = await run_in_threadpool(
            collector.runs.upsert_run,
            run_id,
            body.project,
            body.name,
            body.config,
            body.host,
            body.rank,
            body.tags,
            body.environment,
        )
    except Rejected as e:
        raise ApiError(409, e.reason, str(e)) from None
    return m.run_out(row, collector.settings.run_url(run_id))


@router.post("/{run_id}/batches", response_model=m.IngestOut, openapi_extra={"requestBody": m.BATCH_REQUEST_BODY})
async def ingest(request: Request, run_id: RunId, who: Ingest, collector: CollectorDep) -> m.IngestOut:
    """Ingest one wire batch (the SDK does it)."""
    if who.project is not None:
        await run_in_threadpool(visible, collector, who, run_id)
    body = await read_body(request, collector.settings.max_body_bytes)
    try:
        batch = wire.decode_columns(body)
    except wire.WireError as e:
        raise ApiError(400 if e.reason in UNPARSEABLE else 422, e.reason, str(e)) from None
    if batch.run != run_id:
        raise ApiError(422, "run_mismatch", f"batch is for run {batch.run!r}, posted to {run_id!r}")
    tracer = request.app.state.tracer
    with tracer.start_as_current_span("store.ingest", attributes={"optiscope.points": batch.n_points()}):
        try:
            res = await run_in_threadpool(collector.ingestor.ingest, batch, collector.settings.run_url(run_id))
        except Rejected as e:
            raise ApiError(422, e.reason, str(e)) from None
    metrics = collector.metrics
    metrics.batches.labels("duplicate" if res.duplicate else "stored").inc()
    metrics.points.inc(res.points)
    for rule in res.fired:
        metrics.alerts.labels(rule).inc()
    if res.alerts:
        collector.dispatcher.wake()
    return m.IngestOut(duplicate=res.duplicate, points=res.points, alerts=res.alerts)


@router.post("/{run_id}/finish", response_model=m.RunOut, openapi_extra=body_schema(m.FinishIn))
async def finish_run(request: Request, run_id: RunId, who: Ingest, collector: CollectorDep) -> m.RunOut:
    """Mark a rank finished or crashed."""
    body = await parse(request, m.FinishIn, collector.settings.max_body_bytes)
    await run_in_threadpool(visible, collector, who, run_id)
    row = await run_in_threadpool(collector.ranks.finish_run, run_id, body.status, body.rank)
    if body.status == "crashed":
        collector.metrics.crashed.labels("reported").inc()
    return m.run_out(row, collector.settings.run_url(run_id))


@router.post("/{run_id}/heartbeat", response_model=m.RunOut, openapi_extra=body_schema(m.HeartbeatIn))
async def heartbeat(request: Request, run_id: RunId, who: Ingest, collector: CollectorDep) -> m.RunOut:
    """A rank is alive (the SDK sends it when it has had nothing else to send for a while)."""
    body = await parse(request, m.HeartbeatIn, collector.settings.max_body_bytes)
    await run_in_threadpool(visible, collector, who, run_id)
    row = await run_in_threadpool(collector.ranks.heartbeat, run_id, body.rank)
    return m.run_out(row, collector.settings.run_url(run_id))
