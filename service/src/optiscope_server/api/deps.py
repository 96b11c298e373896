"""The API's dependencies: the collector's parts, the caller and its scopes, visibility checks,
and JSON bodies read through the same limits as batches.

Routes declare what they need with ``Annotated`` types: ``collector: CollectorDep``, ``who: Read``
(or ``Ingest``, ``Admin``), ``run_id: RunId``.
"""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from pydantic import BaseModel, ValidationError

from optiscope import wire

from ..auth import OPEN, ROOT, Principal, loopback_host
from ..collector import Collector
from ..storage import NotFound
from .errors import ApiError
from .params import read_body

M = TypeVar("M", bound=BaseModel)


def get_collector(request: Request) -> Collector:
    return request.app.state.collector


CollectorDep = Annotated[Collector, Depends(get_collector)]
RunId = Annotated[str, Path(pattern=wire.RUN_ID_RE.pattern, max_length=64)]
#: Upper bound of integer parameters: steps, ranks and ids fit a signed 64-bit column with room.
BIG = 2**62
INT32 = 2**31 - 1  # alert and webhook ids are 32-bit on PostgreSQL


def principal(request: Request, collector: CollectorDep) -> Principal:
    """The caller. Open (every scope, every project) only while no authentication is configured
    (no --token, no active token in the database) on a loopback address; otherwise a valid
    bearer token is required: the root --token, or one made with ``optiscope token create``."""
    settings = collector.settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if settings.token and hmac.compare_digest(token.encode(), settings.token.encode()):
            return ROOT
        who = collector.verifier.verify(token)
        if who is not None:
            return who
    if not (settings.require_auth or settings.token or collector.verifier.any_token()):
        if not loopback_host(request.headers.get("host", "")):
            # A page whose name was re-pointed at 127.0.0.1 (DNS rebinding) reaches us with its
            # own name as Host: the open collector answers only requests addressed to loopback.
            raise ApiError(
                403,
                "host_not_allowed",
                "without tokens the collector answers only requests addressed to localhost, 127.0.0.1 or [::1]",
            )
        return OPEN
    raise ApiError(
        401,
        "unauthorized",
        "a valid 'Authorization: Bearer <token>' header is required (missing, unknown or revoked token)",
    )


def need(scope: str) -> Any:
    async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:  # no I/O: stays on the loop
        if not who.allows(scope):
            raise ApiError(403, "insufficient_scope", f"this needs a token with the {scope!r} scope")
        return who

    return Depends(check)


Ingest = Annotated[Principal, need("ingest")]
Read = Annotated[Principal, need("read")]
Admin = Annotated[Principal, need("admin")]


def visible(collector: Collector, who: Principal, run_id: str) -> None:
    """404 for a run that does not exist or belongs to a project the caller cannot see."""
    if who.project is not None and collector.runs.run_project(run_id) != who.project:
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


async def parse(request: Request, model: type[M], limit: int) -> M:
    """A JSON body through the same limits and gzip decoding as batches (the SDK compresses
    any body over 1 KiB, a run's config included)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Also what keeps a web page from posting here: a cross-site form or fetch without a
        # preflight cannot send application/json (an open loopback collector has no token to check).
        raise ApiError(415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)")
    body = await read_body(request, limit)
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        raise ApiError(422, "invalid_body", json.loads(e.json(include_url=False, include_input=False))) from None


def body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI for a JSON body that the route reads itself (through ``parse``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
