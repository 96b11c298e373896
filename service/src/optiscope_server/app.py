"""The collector's HTTP surface: ingest, REST history under /api/v1, /metrics, /healthz."""
from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from optiscope import wire

from . import access, hooks, webhook_routes
from . import models as m
from .access import Principal
from .inputs import ApiError, config_filters, decode_cursor, encode_cursor, read_body, refuse_nul, series_csv
from .lifecycle import Reaper
from .metrics import Metrics
from .store import NotFound, Rejected, Store
from .telemetry import default_provider, instrument
from .webhooks import DEFAULT_SCHEDULE, WebhookDispatcher

RUN_ID = Path(pattern=wire.RUN_ID_RE.pattern, max_length=64)
#: Upper bound of integer parameters: steps, ranks and ids fit a signed 64-bit column with room.
BIG = 2**62
INT32 = 2**31 - 1  # alert ids are 32-bit on PostgreSQL
#: The error answers every /api/v1 operation can give besides its own (documented in OpenAPI).
ERRORS = {401: {"model": m.ErrorOut, "description": "missing, unknown or revoked token"},
          403: {"model": m.ErrorOut, "description": "the token's scope or project does not allow this"},
          404: {"model": m.ErrorOut, "description": "no such object, or not in the token's project"},
          422: {"description": "invalid input: the offending field is named"}}
#: A batch is raw bytes (wire version 2, binary) or JSON (version 1); see the README's wire format.
BATCH_BODY = {"requestBody": m.BATCH_REQUEST_BODY}
#: Wire reasons for a body that cannot be parsed at all (400); every other wire reason is 422.
UNPARSEABLE = frozenset({"malformed_json", "truncated", "trailing_bytes"})


@dataclass
class Settings:
    """Every bound has a documented default (README, "Collector settings")."""

    db_url: str = "sqlite:///optiscope.db"
    webhooks: list[str] = field(default_factory=list)   # [FORMAT=]URL, every project's alerts
    webhook_secrets: list[str] = field(default_factory=list)  # sign the configured webhooks, newest first
    allow_internal_webhooks: bool = False         # private, loopback, link-local targets allowed
    webhook_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    token: str | None = None
    public_url: str = "http://127.0.0.1:8737"
    max_body_bytes: int = 8 * 1024 * 1024        # after decompression
    max_series_per_run: int = 10_000
    metrics_max_runs: int = 200
    metrics_active_window: float = 300.0          # seconds a finished run stays in /metrics
    max_points_per_response: int = 100_000
    heartbeat_timeout: float = 300.0              # seconds of silence before a running rank is crashed
    require_auth: bool = False                    # set when listening beyond loopback: never open


class FinishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["finished", "crashed"] = "finished"
    rank: int = Field(0, ge=0, le=wire.MAX_RANK)


class HeartbeatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(0, ge=0, le=wire.MAX_RANK)


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(None, max_length=1000, pattern=m.NO_NUL)


def create_app(settings: Settings, tracer_provider=None) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.db_url, max_series_per_run=settings.max_series_per_run)
        store.seen_interval = min(5.0, settings.heartbeat_timeout / 4)
        metrics = Metrics(store, settings.metrics_max_runs, settings.metrics_active_window)
        hooks.sync_config(store.engine, [hooks.parse_spec(w) for w in settings.webhooks], settings.webhook_secrets)
        dispatcher = WebhookDispatcher(store, on_result=lambda ok: metrics.webhooks.labels(
            "delivered" if ok else "failed").inc(), schedule=settings.webhook_schedule,
            allow_internal=settings.allow_internal_webhooks, run_url=run_url)
        dispatcher.start()
        reaper = Reaper(store, settings.heartbeat_timeout, lambda: metrics.crashed.labels("heartbeat").inc())
        reaper.start()
        state.update(store=store, metrics=metrics, dispatcher=dispatcher, verifier=access.Verifier(store.engine))
        yield
        reaper.stop()
        dispatcher.stop()
        store.close()

    app = FastAPI(title="optiscope collector", version="0.1.0", lifespan=lifespan, dependencies=[Depends(refuse_nul)],
                  description="Ingest, history, metrics and alerts for optimizer-state observability.")
    app.state.tracer_provider = tracer_provider or default_provider()
    tracer = instrument(app, app.state.tracer_provider)

    def store() -> Store:
        return state["store"]

    def reject(reason: str) -> None:
        state["metrics"].rejections.labels(reason).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if request.url.path.startswith("/api/v1/runs") and request.method in ("PUT", "POST"):
            reject(exc.reason)
        return JSONResponse({"reason": exc.reason, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(LookupError)  # NotFound, and rows deleted meanwhile by another request
    async def _not_found(request: Request, exc: LookupError):
        return JSONResponse({"reason": "not_found", "detail": f"not found (or not yours): {exc}"}, status_code=404)

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, exc: OperationalError):
        # A deadlock victim, a lost connection, a database restarting: the same request can succeed
        # later, and 503 is what the SDK retries (a 500 would make it drop the batch).
        return JSONResponse({"reason": "database_unavailable", "detail": "the database could not complete the "
                             "request; try again"}, status_code=503, headers={"Retry-After": "1"})

    # -- access ------------------------------------------------------------------------------
    def principal(request: Request) -> Principal:
        """The caller. Open (every scope, every project) only while no authentication is configured
        (no --token, no active token in the database) on a loopback address; otherwise a valid
        bearer token is required: the root --token, or one made with ``optiscope token create``."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            if settings.token and hmac.compare_digest(token.encode(), settings.token.encode()):
                return access.ROOT
            who = state["verifier"].verify(token)
            if who is not None:
                return who
        if not (settings.require_auth or settings.token or state["verifier"].any_token()):
            if not access.loopback_host(request.headers.get("host", "")):
                # A page whose name was re-pointed at 127.0.0.1 (DNS rebinding) reaches us with its
                # own name as Host: the open collector answers only requests addressed to loopback.
                raise ApiError(403, "host_not_allowed", "without tokens the collector answers only requests "
                                                        "addressed to localhost, 127.0.0.1 or [::1]")
            return access.OPEN
        raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required "
                                            "(missing, unknown or revoked token)")

    def need(scope: str):
        async def check(who: Principal = Depends(principal)) -> Principal:  # no I/O: stays on the loop
            if not who.allows(scope):
                raise ApiError(403, "insufficient_scope", f"this needs a token with the {scope!r} scope")
            return who
        return Depends(check)

    def visible(who: Principal, run_id: str) -> None:
        """404 for a run that does not exist or belongs to a project the caller cannot see."""
        if who.project is not None and store().run_project(run_id) != who.project:
            raise NotFound(run_id)

    def own_project(who: Principal, project: str | None) -> str | None:
        """The project a listing is restricted to: the caller's own, or 404 for another one."""
        if who.project is None:
            return project
        if project is not None and project != who.project:
            raise NotFound(f"project {project}")
        return who.project

    def remote(request: Request) -> str | None:
        return request.client.host if request.client else None

    INGEST, READ, ADMIN = need("ingest"), need("read"), need("admin")

    def run_url(run_id: str) -> str:
        return f"{settings.public_url.rstrip('/')}/api/v1/runs/{run_id}"

    # -- service -----------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        with store().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "database": store().engine.dialect.name}

    @app.get("/metrics", tags=["service"], response_class=Response)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(state["metrics"].registry), media_type=CONTENT_TYPE_LATEST)

    # -- ingest ------------------------------------------------------------------------------
    async def parse(request: Request, model: type[BaseModel]):
        """A JSON body through the same limits and gzip decoding as batches (the SDK compresses
        any body over 1 KiB, a run's config included)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            # Also what keeps a web page from posting here: a cross-site form or fetch without a
            # preflight cannot send application/json (an open loopback collector has no token to check).
            raise ApiError(415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)")
        body = await read_body(request, settings.max_body_bytes)
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as e:
            raise ApiError(422, "invalid_body", json.loads(e.json(include_url=False, include_input=False))) from None

    def body_schema(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.put("/api/v1/runs/{run_id}", tags=["ingest"], response_model=m.RunOut,
             openapi_extra=body_schema(m.RunIn), responses=ERRORS)
    async def register_run(request: Request, run_id: str = RUN_ID, who: Principal = INGEST):
        """Register a run, or one rank of it (idempotent; the SDK does it)."""
        body = await parse(request, m.RunIn)
        if not who.sees(body.project):
            raise ApiError(403, "project_not_allowed", f"this token cannot register runs in project {body.project!r}")
        if who.project is not None:  # a run of another project is not found, rather than a 409 that tells it exists
            owner = await run_in_threadpool(store().run_project, run_id)
            if owner is not None and owner != who.project:
                raise NotFound(run_id)
        try:
            row = await run_in_threadpool(store().upsert_run, run_id, body.project, body.name, body.config, body.host,
                                          body.rank, body.tags, body.environment)
        except Rejected as e:
            raise ApiError(409, e.reason, str(e)) from None
        return m.run_out(row, run_url(run_id))

    @app.post("/api/v1/runs/{run_id}/batches", tags=["ingest"], response_model=m.IngestOut,
              openapi_extra=BATCH_BODY, responses=ERRORS)
    async def ingest(request: Request, run_id: str = RUN_ID, who: Principal = INGEST):
        """Ingest one wire batch (the SDK does it)."""
        if who.project is not None:
            await run_in_threadpool(visible, who, run_id)
        body = await read_body(request, settings.max_body_bytes)
        try:
            batch = wire.decode_columns(body)
        except wire.WireError as e:
            raise ApiError(400 if e.reason in UNPARSEABLE else 422, e.reason, str(e)) from None
        if batch.run != run_id:
            raise ApiError(422, "run_mismatch", f"batch is for run {batch.run!r}, posted to {run_id!r}")
        with tracer.start_as_current_span("store.ingest", attributes={"optiscope.points": batch.n_points()}):
            try:
                res = await run_in_threadpool(store().ingest, batch, run_url(run_id))
            except Rejected as e:
                raise ApiError(422, e.reason, str(e)) from None
        metrics = state["metrics"]
        metrics.batches.labels("duplicate" if res.duplicate else "stored").inc()
        metrics.points.inc(res.points)
        for rule in res.fired:
            metrics.alerts.labels(rule).inc()
        if res.alerts:
            state["dispatcher"].wake()
        return m.IngestOut(duplicate=res.duplicate, points=res.points, alerts=res.alerts)

    @app.post("/api/v1/runs/{run_id}/finish", tags=["ingest"], response_model=m.RunOut,
              openapi_extra=body_schema(FinishIn), responses=ERRORS)
    async def finish_run(request: Request, run_id: str = RUN_ID, who: Principal = INGEST):
        """Mark a rank finished or crashed."""
        body = await parse(request, FinishIn)
        await run_in_threadpool(visible, who, run_id)
        row = await run_in_threadpool(store().finish_run, run_id, body.status, body.rank)
        if body.status == "crashed":
            state["metrics"].crashed.labels("reported").inc()
        return m.run_out(row, run_url(run_id))

    @app.post("/api/v1/runs/{run_id}/heartbeat", tags=["ingest"], response_model=m.RunOut,
              openapi_extra=body_schema(HeartbeatIn), responses=ERRORS)
    async def heartbeat(request: Request, run_id: str = RUN_ID, who: Principal = INGEST):
        """A rank is alive (the SDK sends it when it has had nothing else to send for a while)."""
        body = await parse(request, HeartbeatIn)
        await run_in_threadpool(visible, who, run_id)
        return m.run_out(await run_in_threadpool(store().heartbeat, run_id, body.rank), run_url(run_id))

    # -- history -----------------------------------------------------------------------------
    @app.get("/api/v1/projects", tags=["history"], response_model=m.ProjectList, responses=ERRORS)
    def list_projects(who: Principal = READ):
        """The projects the caller can see, with their number of runs and last activity."""
        return m.ProjectList(projects=[m.ProjectOut(**p) for p in store().list_projects(who.project)])

    @app.get("/api/v1/runs", tags=["history"], response_model=m.RunList, responses=ERRORS)
    def list_runs(project: str | None = Query(None, max_length=wire.MAX_NAME_LEN),
                  status: Literal["running", "finished", "crashed"] | None = None,
                  tag: list[str] = Query([], description="repeatable: runs carrying every tag given"),
                  created_after: float | None = Query(None, description="unix seconds, inclusive"),
                  created_before: float | None = Query(None, description="unix seconds, exclusive"),
                  config: list[str] = Query([], description="key=value, repeatable: a top-level config entry "
                                                            "equal to value (a JSON number, true, false, null, or "
                                                            "else a string)"),
                  sort: Literal["created_at", "updated_at", "name"] = "created_at",
                  order: Literal["desc", "asc"] = "desc", limit: int = Query(100, ge=1, le=1000),
                  cursor: str | None = Query(None, max_length=1000, description="next_cursor of the previous page"),
                  who: Principal = READ):
        """Runs, newest first by default, one page at a time."""
        project = own_project(who, project)
        after = decode_cursor(cursor, sort, order) if cursor else None
        rows, last = store().list_runs(project, status, limit, created_after=created_after,
                                       created_before=created_before, config=config_filters(config), tags=tag,
                                       sort=sort, descending=order == "desc", after=after)
        return m.RunList(runs=[m.run_out(r, run_url(r["id"])) for r in rows],
                         next_cursor=encode_cursor(last, sort, order) if last else None)

    def delete(request: Request, who: Principal, run_id: str | None, project: str | None, force: bool) -> m.Deleted:
        try:
            return m.Deleted(deleted=store().delete_runs(run_id, project, force, actor=who.actor,
                                                         remote=remote(request)))
        except Rejected as e:
            raise ApiError(409, e.reason, str(e)) from None

    @app.delete("/api/v1/runs/{run_id}", tags=["retention"], response_model=m.Deleted, responses=ERRORS)
    def delete_run(request: Request, run_id: str = RUN_ID,
                   force: bool = Query(False, description="delete it even while running"), who: Principal = ADMIN):
        """Delete a run completely: ranks, series, points, alerts and their webhook deliveries."""
        visible(who, run_id)
        return delete(request, who, run_id, None, force)

    @app.delete("/api/v1/projects/{project}", tags=["retention"], response_model=m.Deleted, responses=ERRORS)
    def delete_project(request: Request, project: str = Path(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN),
                       force: bool = Query(False, description="delete its runs even while running"),
                       who: Principal = ADMIN):
        """Delete a project and every run of it completely."""
        own_project(who, project)
        return delete(request, who, None, project, force)

    @app.get("/api/v1/runs/{run_id}", tags=["history"], response_model=m.RunDetail, responses=ERRORS)
    def get_run(run_id: str = RUN_ID, who: Principal = READ):
        """One run: config, tags, environment of each rank, status, and a summary (last values, alerts)."""
        visible(who, run_id)
        return m.run_detail(store().get_run(run_id), run_url(run_id))

    @app.get("/api/v1/runs/{run_id}/series", tags=["history"], response_model=m.SeriesList, responses=ERRORS)
    def list_series(run_id: str = RUN_ID, who: Principal = READ):
        """The series catalog of a run, with each series' last step and value."""
        visible(who, run_id)
        return m.SeriesList(run_id=run_id, series=[m.SeriesInfo(**s) for s in store().list_series(run_id)])

    def series_data(run_id: str, name: str, rank, start, end, limit, max_points) -> m.SeriesData:
        steps, ranks, values, truncated, width = store().get_series(run_id, name, rank, start, end, limit, max_points)
        return m.SeriesData(run_id=run_id, name=name, steps=steps, ranks=ranks, values=values, truncated=truncated,
                            downsampled=width is not None, bucket_steps=width)

    limit_q = Query(settings.max_points_per_response, ge=1, le=settings.max_points_per_response)
    max_points_q = Query(None, ge=4, le=settings.max_points_per_response,
                         description="downsample to about this many points, keeping every bucket's extremes "
                                     "and every non-finite point")

    @app.get("/api/v1/runs/{run_id}/series/{name:path}", tags=["history"], response_model=m.SeriesData,
             responses={**ERRORS, 200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                                        "description": "the points, as JSON or (format=csv) as CSV: step,rank,value"}})
    def get_series(name: str, run_id: str = RUN_ID, rank: int | None = Query(None, ge=0, le=wire.MAX_RANK),
                   start: int | None = Query(None, ge=0, le=BIG), end: int | None = Query(None, ge=0, le=BIG),
                   limit: int = limit_q, max_points: int | None = max_points_q,
                   format: Literal["json", "csv"] = "json", who: Principal = READ):
        """The points of one series, optionally downsampled, as JSON or CSV."""
        visible(who, run_id)
        data = series_data(run_id, name, rank, start, end, limit, max_points)
        if format == "csv":
            return Response(series_csv(data), media_type="text/csv",
                            headers={"Content-Disposition": f'attachment; filename="{run_id}.csv"'})
        return data

    @app.get("/api/v1/series", tags=["history"], response_model=m.SeriesComparison, responses=ERRORS)
    def compare_series(name: str = Query(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN),
                       run: list[str] = Query(min_length=1, max_length=20, description="run ids, repeated"),
                       rank: int | None = Query(None, ge=0, le=wire.MAX_RANK), start: int | None = Query(None, ge=0, le=BIG),
                       end: int | None = Query(None, ge=0, le=BIG), limit: int = limit_q,
                       max_points: int | None = max_points_q, who: Principal = READ):
        """The same series of several runs in one call, each downsampled alike: for comparison."""
        for r in run:
            if not wire.RUN_ID_RE.fullmatch(r):
                raise ApiError(422, "bad_run_id", {"loc": ["query", "run"], "input": r})
            visible(who, r)
        return m.SeriesComparison(name=name, runs=[series_data(r, name, rank, start, end, limit, max_points)
                                                   for r in run])

    # -- alerts ------------------------------------------------------------------------------
    def alert_list(rows: list[dict], limit: int) -> m.AlertList:
        return m.AlertList(alerts=[m.alert_out(a, run_url(a["run_id"])) for a in rows],
                           next_cursor=str(rows[-1]["id"]) if len(rows) == limit else None)

    before_q = Query(None, ge=1, le=INT32, description="next_cursor of the previous page (alerts older than that)")

    @app.get("/api/v1/runs/{run_id}/alerts", tags=["alerts"], response_model=m.AlertList, responses=ERRORS)
    def run_alerts(run_id: str = RUN_ID, state: Literal["firing", "resolved"] | None = None,
                   acknowledged: bool | None = None, limit: int = Query(1000, ge=1, le=10_000),
                   cursor: int | None = before_q, who: Principal = READ):
        """The run's alerts, newest first."""
        visible(who, run_id)
        return alert_list(store().list_alerts(run_id, state, limit, acknowledged=acknowledged, before=cursor), limit)

    @app.get("/api/v1/alerts", tags=["alerts"], response_model=m.AlertList, responses=ERRORS)
    def all_alerts(state: Literal["firing", "resolved"] | None = None,
                   project: str | None = Query(None, max_length=wire.MAX_NAME_LEN),
                   rule: str | None = Query(None, max_length=64),
                   severity: str | None = Query(None, max_length=16), acknowledged: bool | None = None,
                   limit: int = Query(1000, ge=1, le=10_000), cursor: int | None = before_q, who: Principal = READ):
        """Alerts of every run the caller can see, newest first, filtered."""
        project = own_project(who, project)
        return alert_list(store().list_alerts(None, state, limit, project=project, rule=rule, severity=severity,
                                              acknowledged=acknowledged, before=cursor), limit)

    @app.post("/api/v1/alerts/{alert_id}/acknowledge", tags=["alerts"], response_model=m.AlertOut,
              openapi_extra=body_schema(AckIn), responses=ERRORS)
    async def acknowledge(request: Request, alert_id: int = Path(ge=1, le=INT32), who: Principal = ADMIN):
        """Acknowledge an alert: someone owns it now. Idempotent; recorded in the audit log."""
        body = await parse(request, AckIn)
        row = await run_in_threadpool(store().get_alert, alert_id)
        if not who.sees(row["project"]):
            raise NotFound(f"alert {alert_id}")
        row = await run_in_threadpool(store().acknowledge, alert_id, who.actor, body.note, remote(request))
        return m.alert_out(row, run_url(row["run_id"]))

    # -- audit -------------------------------------------------------------------------------
    @app.get("/api/v1/audit", tags=["admin"], response_model=m.AuditList, responses=ERRORS)
    def audit_log(project: str | None = Query(None, max_length=wire.MAX_NAME_LEN),
                  action: str | None = Query(None, max_length=64), limit: int = Query(100, ge=1, le=1000),
                  cursor: int | None = Query(None, ge=1, le=BIG, description="next_cursor of the previous page"),
                  who: Principal = ADMIN):
        """Administrative actions (tokens, acknowledgements, deletions), newest first."""
        project = own_project(who, project)
        rows = access.list_audit(store().engine, project, action, limit, cursor)
        return m.AuditList(entries=[m.AuditEntry(**r) for r in rows],
                           next_cursor=str(rows[-1]["id"]) if len(rows) == limit else None)

    webhook_routes.add_routes(app, store, ADMIN, remote, ERRORS, body_schema, parse)
    return app
