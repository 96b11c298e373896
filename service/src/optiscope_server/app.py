"""The collector's HTTP surface: ingest, REST history under /api/v1, /metrics, /healthz."""
from __future__ import annotations

import base64
import hmac
import json
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text

from optiscope import wire

from . import models as m
from .metrics import Metrics
from .store import NotFound, Rejected, Store
from .telemetry import default_provider, instrument
from .webhooks import WebhookDispatcher

RUN_ID = Path(pattern=wire.RUN_ID_RE.pattern, max_length=64)
#: Wire reasons for a body that cannot be parsed at all (400); every other wire reason is 422.
UNPARSEABLE = frozenset({"malformed_json", "truncated", "trailing_bytes"})


@dataclass
class Settings:
    """Every bound has a documented default (README, "Collector settings")."""

    db_url: str = "sqlite:///optiscope.db"
    webhooks: list[str] = field(default_factory=list)
    token: str | None = None
    public_url: str = "http://127.0.0.1:8737"
    max_body_bytes: int = 8 * 1024 * 1024        # after decompression
    max_series_per_run: int = 10_000
    metrics_max_runs: int = 200
    metrics_active_window: float = 300.0          # seconds a finished run stays in /metrics
    max_points_per_response: int = 100_000


class ApiError(Exception):
    def __init__(self, status: int, reason: str, detail):
        self.status, self.reason, self.detail = status, reason, detail


async def read_body(request: Request, limit: int) -> bytes:
    """The body, with the limit enforced on streamed and on decompressed bytes before parsing."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds {limit}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = d.decompress(body, limit + 1)
        except zlib.error as e:
            raise ApiError(400, "bad_encoding", f"gzip body cannot be decompressed: {e}") from None
        if len(body) > limit or d.unconsumed_tail:
            raise ApiError(413, "body_too_large", f"decompressed body exceeds {limit} bytes")
    elif encoding not in ("identity", ""):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (gzip is)")
    return body


def config_filters(items: list[str]) -> dict[str, str]:
    """``key=value`` query items as {key: the value's JSON text}: a value that parses as JSON (a
    number, true, false, null) matches that JSON value, anything else matches the string."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not wire.NAME_RE.fullmatch(key):
            raise ApiError(422, "bad_config_filter", {"loc": ["query", "config"], "input": item,
                                                      "msg": "expected key=value with a key of letters, digits, _ . : / -"})
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, (dict, list)):
            parsed = value
        out[key] = json.dumps(parsed)
    return out


def encode_cursor(last: tuple, sort: str, order: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([sort, order, *last]).encode()).decode()


def decode_cursor(cursor: str, sort: str, order: str) -> tuple:
    """The (sort value, run id) a page ends on; a cursor made for another sort or order, or not
    made by us, is a 422."""
    try:
        got_sort, got_order, value, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        ok = (got_sort, got_order) == (sort, order) and isinstance(run_id, str) and \
            isinstance(value, str if sort == "name" else (int, float))
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ApiError(422, "bad_cursor", {"loc": ["query", "cursor"],
                                           "msg": "not a next_cursor of this listing (same sort and order)"})
    return value, run_id


def series_csv(data: "m.SeriesData") -> str:
    """step,rank,value lines; values as Python's shortest round-trip repr, non-finite ones spelt
    as in JSON responses (NaN, Infinity, -Infinity)."""
    spell = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
    lines = ["step,rank,value"]
    for s, r, v in zip(data.steps, data.ranks, data.values):
        x = repr(v)
        lines.append(f"{s},{r},{spell.get(x, x)}")
    return "\n".join(lines) + "\n"


class FinishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["finished", "crashed"] = "finished"
    rank: int = Field(0, ge=0)


def create_app(settings: Settings, tracer_provider=None) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.db_url, max_series_per_run=settings.max_series_per_run)
        metrics = Metrics(store, settings.metrics_max_runs, settings.metrics_active_window)
        dispatcher = WebhookDispatcher(store, on_result=lambda ok: metrics.webhooks.labels(
            "delivered" if ok else "failed").inc())
        dispatcher.start()
        state.update(store=store, metrics=metrics, dispatcher=dispatcher)
        yield
        dispatcher.stop()
        store.close()

    app = FastAPI(title="optiscope collector", version="0.1.0", lifespan=lifespan,
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

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return JSONResponse({"reason": "not_found", "detail": f"no such run or series: {exc}"}, status_code=404)

    def authorize(request: Request) -> None:
        if not settings.token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.token.encode()):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")

    api = [Depends(authorize)]

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
        body = await read_body(request, settings.max_body_bytes)
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as e:
            raise ApiError(422, "invalid_body", json.loads(e.json(include_url=False, include_input=False))) from None

    def body_schema(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.put("/api/v1/runs/{run_id}", tags=["ingest"], dependencies=api, response_model=m.RunOut,
             openapi_extra=body_schema(m.RunIn))
    async def register_run(request: Request, run_id: str = RUN_ID):
        body = await parse(request, m.RunIn)
        try:
            row = await run_in_threadpool(store().upsert_run, run_id, body.project, body.name, body.config, body.host,
                                          body.rank)
        except Rejected as e:
            raise ApiError(409, e.reason, str(e)) from None
        return m.run_out(row, run_url(run_id))

    @app.post("/api/v1/runs/{run_id}/batches", tags=["ingest"], dependencies=api, response_model=m.IngestOut)
    async def ingest(request: Request, run_id: str = RUN_ID):
        body = await read_body(request, settings.max_body_bytes)
        try:
            batch = wire.decode_columns(body)
        except wire.WireError as e:
            raise ApiError(400 if e.reason in UNPARSEABLE else 422, e.reason, str(e)) from None
        if batch.run != run_id:
            raise ApiError(422, "run_mismatch", f"batch is for run {batch.run!r}, posted to {run_id!r}")
        with tracer.start_as_current_span("store.ingest", attributes={"optiscope.points": batch.n_points()}):
            try:
                res = await run_in_threadpool(store().ingest, batch, settings.webhooks, run_url(run_id))
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

    @app.post("/api/v1/runs/{run_id}/finish", tags=["ingest"], dependencies=api, response_model=m.RunOut,
              openapi_extra=body_schema(FinishIn))
    async def finish_run(request: Request, run_id: str = RUN_ID):
        body = await parse(request, FinishIn)
        return m.run_out(await run_in_threadpool(store().finish_run, run_id, body.status, body.rank), run_url(run_id))

    # -- history -----------------------------------------------------------------------------
    @app.get("/api/v1/runs", tags=["history"], dependencies=api, response_model=m.RunList)
    def list_runs(project: str | None = None, status: Literal["running", "finished", "crashed"] | None = None,
                  created_after: float | None = Query(None, description="unix seconds, inclusive"),
                  created_before: float | None = Query(None, description="unix seconds, exclusive"),
                  config: list[str] = Query([], description="key=value, repeatable: a top-level config entry "
                                                            "equal to value (a JSON number, true, false, null, or "
                                                            "else a string)"),
                  sort: Literal["created_at", "updated_at", "name"] = "created_at",
                  order: Literal["desc", "asc"] = "desc", limit: int = Query(100, ge=1, le=1000),
                  cursor: str | None = Query(None, max_length=1000, description="next_cursor of the previous page")):
        """Runs, newest first by default, one page at a time."""
        after = decode_cursor(cursor, sort, order) if cursor else None
        rows, last = store().list_runs(project, status, limit, created_after=created_after,
                                       created_before=created_before, config=config_filters(config), sort=sort,
                                       descending=order == "desc", after=after)
        return m.RunList(runs=[m.run_out(r, run_url(r["id"])) for r in rows],
                         next_cursor=encode_cursor(last, sort, order) if last else None)

    def delete(run_id: str | None, project: str | None, force: bool) -> m.Deleted:
        try:
            return m.Deleted(deleted=store().delete_runs(run_id, project, force))
        except Rejected as e:
            raise ApiError(409, e.reason, str(e)) from None

    @app.delete("/api/v1/runs/{run_id}", tags=["retention"], dependencies=api, response_model=m.Deleted)
    def delete_run(run_id: str = RUN_ID, force: bool = Query(False, description="delete it even while running")):
        """Delete a run completely: ranks, series, points, alerts and their webhook deliveries."""
        return delete(run_id, None, force)

    @app.delete("/api/v1/projects/{project}", tags=["retention"], dependencies=api, response_model=m.Deleted)
    def delete_project(project: str = Path(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN),
                       force: bool = Query(False, description="delete its runs even while running")):
        """Delete every run of a project completely."""
        return delete(None, project, force)

    @app.get("/api/v1/runs/{run_id}", tags=["history"], dependencies=api, response_model=m.RunDetail)
    def get_run(run_id: str = RUN_ID):
        return m.run_detail(store().get_run(run_id), run_url(run_id))

    @app.get("/api/v1/runs/{run_id}/series", tags=["history"], dependencies=api, response_model=m.SeriesList)
    def list_series(run_id: str = RUN_ID):
        return m.SeriesList(run_id=run_id, series=[m.SeriesInfo(**s) for s in store().list_series(run_id)])

    def series_data(run_id: str, name: str, rank, start, end, limit, max_points) -> m.SeriesData:
        steps, ranks, values, truncated, width = store().get_series(run_id, name, rank, start, end, limit, max_points)
        return m.SeriesData(run_id=run_id, name=name, steps=steps, ranks=ranks, values=values, truncated=truncated,
                            downsampled=width is not None, bucket_steps=width)

    limit_q = Query(settings.max_points_per_response, ge=1, le=settings.max_points_per_response)
    max_points_q = Query(None, ge=4, le=settings.max_points_per_response,
                         description="downsample to about this many points, keeping every bucket's extremes "
                                     "and every non-finite point")

    @app.get("/api/v1/runs/{run_id}/series/{name:path}", tags=["history"], dependencies=api,
             response_model=m.SeriesData,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                              "description": "the points, as JSON or (format=csv) as CSV: step,rank,value"}})
    def get_series(name: str, run_id: str = RUN_ID, rank: int | None = Query(None, ge=0),
                   start: int | None = Query(None, ge=0), end: int | None = Query(None, ge=0),
                   limit: int = limit_q, max_points: int | None = max_points_q,
                   format: Literal["json", "csv"] = "json"):
        data = series_data(run_id, name, rank, start, end, limit, max_points)
        if format == "csv":
            return Response(series_csv(data), media_type="text/csv",
                            headers={"Content-Disposition": f'attachment; filename="{run_id}.csv"'})
        return data

    @app.get("/api/v1/series", tags=["history"], dependencies=api, response_model=m.SeriesComparison)
    def compare_series(name: str = Query(pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN),
                       run: list[str] = Query(min_length=1, max_length=20, description="run ids, repeated"),
                       rank: int | None = Query(None, ge=0), start: int | None = Query(None, ge=0),
                       end: int | None = Query(None, ge=0), limit: int = limit_q,
                       max_points: int | None = max_points_q):
        """The same series of several runs in one call, each downsampled alike: for comparison."""
        for r in run:
            if not wire.RUN_ID_RE.fullmatch(r):
                raise ApiError(422, "bad_run_id", {"loc": ["query", "run"], "input": r})
        return m.SeriesComparison(name=name, runs=[series_data(r, name, rank, start, end, limit, max_points)
                                                   for r in run])

    @app.get("/api/v1/runs/{run_id}/alerts", tags=["alerts"], dependencies=api, response_model=m.AlertList)
    def run_alerts(run_id: str = RUN_ID, state: Literal["firing", "resolved"] | None = None):
        return m.AlertList(alerts=[m.alert_out(a, run_url(a["run_id"])) for a in store().list_alerts(run_id, state)])

    @app.get("/api/v1/alerts", tags=["alerts"], dependencies=api, response_model=m.AlertList)
    def all_alerts(state: Literal["firing", "resolved"] | None = None, limit: int = Query(1000, ge=1, le=10_000)):
        return m.AlertList(alerts=[m.alert_out(a, run_url(a["run_id"])) for a in store().list_alerts(None, state, limit)])

    return app
