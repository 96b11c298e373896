"""``/healthz`` (the database answers) and ``/metrics`` (Prometheus exposition)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from .deps import CollectorDep

router = APIRouter(tags=["service"])


@router.get("/healthz")
def healthz(collector: CollectorDep) -> dict:
    with collector.db.read() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok", "database": collector.db.dialect}


@router.get("/metrics", response_class=Response)
def prometheus_metrics(collector: CollectorDep) -> Response:
    return Response(generate_latest(collector.metrics.registry), media_type=CONTENT_TYPE_LATEST)
