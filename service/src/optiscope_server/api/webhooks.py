"""``/api/v1/webhooks``: endpoints that receive alerts, managed by admins (audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from ..alerting import endpoints, signing
from ..auth import Principal
from ..collector import Collector
from ..storage import NotFound
from .deps import INT32, Admin, CollectorDep, body_schema, parse, remote
from .errors import ERRORS, ApiError
from .schemas import WebhookIn, WebhookList, WebhookOut

router = APIRouter(prefix="/api/v1/webhooks", tags=["alerts"], responses=ERRORS)
WebhookId = Annotated[int, Path(ge=1, le=INT32)]


def owned(collector: Collector, who: Principal, webhook_id: int) -> dict:
    """The endpoint, if the caller's project owns it (404 otherwise)."""
    row = endpoints.get(collector.db.engine, webhook_id)
    if row is None or not (who.project is None or row["project"] == who.project):
        raise NotFound(f"webhook {webhook_id}")
    return row


@router.post("", response_model=WebhookOut, status_code=201, openapi_extra=body_schema(WebhookIn))
async def create_webhook(request: Request, who: Admin, collector: CollectorDep) -> WebhookOut:
    """Send a project's alerts to an endpoint, in the native, Slack or Alertmanager format."""
    body = await parse(request, WebhookIn, collector.settings.max_body_bytes)  # the limits of every JSON body
    project = body.project if who.project is None else (body.project or who.project)
    if who.project is not None and project != who.project:
        raise ApiError(403, "project_not_allowed", f"this token cannot add webhooks to project {project!r}")
    if body.secret is not None and not signing.valid_secret(body.secret):
        raise ApiError(
            422, "bad_secret", {"loc": ["body", "secret"], "msg": "whsec_ followed by base64 of 24 to 64 bytes"}
        )
    try:
        row, secret = await run_in_threadpool(
            endpoints.create,
            collector.db.engine,
            body.url,
            body.format,
            project,
            body.secret,
            who.actor,
            remote(request),
            body.signed,
        )
    except ValueError as e:
        raise ApiError(422, "bad_url", {"loc": ["body", "url"], "msg": str(e)}) from None
    return WebhookOut(**row, secret=secret)


@router.get("", response_model=WebhookList)
def list_webhooks(who: Admin, collector: CollectorDep) -> WebhookList:
    """The endpoints the caller's project sends to (all, for the root token)."""
    return WebhookList(webhooks=[WebhookOut(**r) for r in endpoints.listing(collector.db.engine, who.project)])


@router.delete("/{webhook_id}", response_model=WebhookOut)
def delete_webhook(request: Request, webhook_id: WebhookId, who: Admin, collector: CollectorDep) -> WebhookOut:
    """Remove an endpoint; its pending deliveries go with it."""
    row = owned(collector, who, webhook_id)
    if row["source"] == "config":
        raise ApiError(409, "configured", "this endpoint comes from the collector's command line; remove it there")
    endpoints.delete(collector.db.engine, webhook_id, who.actor, remote(request))
    return WebhookOut(**endpoints.public(row))


@router.post("/{webhook_id}/rotate", response_model=WebhookOut)
def rotate_webhook(
    request: Request,
    webhook_id: WebhookId,
    who: Admin,
    collector: CollectorDep,
    finish: Annotated[bool, Query(description="end the rotation: only the newest secret signs")] = False,
) -> WebhookOut:
    """Rotate the signing secret: a new one signs beside the old until the rotation is finished."""
    owned(collector, who, webhook_id)
    secret = endpoints.rotate(collector.db.engine, webhook_id, who.actor, remote(request), finish)
    return WebhookOut(**endpoints.public(endpoints.get(collector.db.engine, webhook_id)), secret=secret)


@router.post("/{webhook_id}/enable", response_model=WebhookOut)
def enable_webhook(request: Request, webhook_id: WebhookId, who: Admin, collector: CollectorDep) -> WebhookOut:
    """Enable an endpoint again (after it answered 410 Gone, say)."""
    owned(collector, who, webhook_id)
    endpoints.set_enabled(collector.db.engine, webhook_id, True, who.actor, remote=remote(request))
    return WebhookOut(**endpoints.public(endpoints.get(collector.db.engine, webhook_id)))
