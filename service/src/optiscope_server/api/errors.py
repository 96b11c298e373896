"""API errors: one exception with a machine-readable reason, and the handlers that turn it, the
stores' NotFound and a database outage into JSON answers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from ..collector import Collector
from .schemas import ErrorOut

#: The error answers every /api/v1 operation can give besides its own (documented in OpenAPI).
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing, unknown or revoked token"},
    403: {"model": ErrorOut, "description": "the token's scope or project does not allow this"},
    404: {"model": ErrorOut, "description": "no such object, or not in the token's project"},
    422: {"description": "invalid input: the offending field is named"},
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, detail: Any):
        self.status, self.reason, self.detail = status, reason, detail


def install(app: FastAPI) -> None:
    """Register the handlers on the app."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if request.url.path.startswith("/api/v1/runs") and request.method in ("PUT", "POST"):
            collector: Collector = request.app.state.collector
            collector.metrics.rejections.labels(exc.reason).inc()
        return JSONResponse({"reason": exc.reason, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(LookupError)  # NotFound, and rows deleted meanwhile by another request
    async def _not_found(request: Request, exc: LookupError) -> JSONResponse:
        return JSONResponse({"reason": "not_found", "detail": f"not found (or not yours): {exc}"}, status_code=404)

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        # A deadlock victim, a lost connection, a database restarting: the same request can succeed
        # later, and 503 is what the SDK retries (a 500 would make it drop the batch).
        return JSONResponse(
            {"reason": "database_unavailable", "detail": "the database could not complete the request; try again"},
            status_code=503,
            headers={"Retry-After": "1"},
        )
