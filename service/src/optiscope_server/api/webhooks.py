"""``/api/v1/webhooks``: endpoints that receive alerts, managed by admins (audited)."""
from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from optiscope import wire

from . import hooks
from .access import Principal
from .errors import NotFound
from .inputs import ApiError


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2000, pattern=r"^https?://[^\x00\s]+$")
    format: Literal["native", "slack", "alertmanager"] = "native"
    project: str | None = Field(None, pattern=wire.NAME_RE.pattern, max_length=wire.MAX_NAME_LEN,
                                description="whose alerts it receives; a project token's own by default; "
                                            "null with the root token: every project's")
    secret: str | None = Field(None, max_length=200, description="whsec_...; made here when absent")
    signed: bool = Field(True, description="false: no webhook-signature (Slack and Alertmanager ignore it)")


class WebhookOut(BaseModel):
    id: int
    url: str
    format: str
    project: str | None
    secrets: int = Field(description="number of signing secrets (two during a rotation)")
    source: str = Field(description="api, or config: given on the collector's command line")
    created_at: float
    created_by: str | None
    disabled_at: float | None
    disabled_reason: str | None
    secret: str | None = Field(None, description="the new signing secret: shown once, on creation or rotation")


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


def add_routes(app: FastAPI, store, admin, remote, responses: dict, body_schema, parse) -> None:
    """Registered by ``create_app`` with its store accessor, admin dependency and body parser."""
    def owned(who: Principal, webhook_id: int) -> dict:
        row = hooks.get(store().engine, webhook_id)
        if row is None or not (who.project is None or row["project"] == who.project):
            raise NotFound(f"webhook {webhook_id}")
        return row

    webhook_id_p = Path(ge=1, le=2**31 - 1)

    @app.post("/api/v1/webhooks", tags=["alerts"], response_model=WebhookOut, status_code=201,
              openapi_extra=body_schema(WebhookIn), responses=responses)
    async def create_webhook(request: Request, who: Principal = admin):
        """Send a project's alerts to an endpoint, in the native, Slack or Alertmanager format."""
        body = await parse(request, WebhookIn)  # the same limits and decoding as every JSON body
        project = body.project if who.project is None else (body.project or who.project)
        if who.project is not None and project != who.project:
            raise ApiError(403, "project_not_allowed", f"this token cannot add webhooks to project {project!r}")
        if body.secret is not None and not hooks.valid_secret(body.secret):
            raise ApiError(422, "bad_secret", {"loc": ["body", "secret"],
                                               "msg": "whsec_ followed by base64 of 24 to 64 bytes"})
        try:
            row, secret = await run_in_threadpool(hooks.create, store().engine, body.url, body.format, project,
                                                  body.secret, who.actor, remote(request), body.signed)
        except ValueError as e:
            raise ApiError(422, "bad_url", {"loc": ["body", "url"], "msg": str(e)}) from None
        return WebhookOut(**row, secret=secret)

    @app.get("/api/v1/webhooks", tags=["alerts"], response_model=WebhookList, responses=responses)
    def list_webhooks(who: Principal = admin):
        """The endpoints the caller's project sends to (all, for the root token)."""
        return WebhookList(webhooks=[WebhookOut(**r) for r in hooks.listing(store().engine, who.project)])

    @app.delete("/api/v1/webhooks/{webhook_id}", tags=["alerts"], response_model=WebhookOut, responses=responses)
    def delete_webhook(request: Request, webhook_id: int = webhook_id_p, who: Principal = admin):
        """Remove an endpoint; its pending deliveries go with it."""
        row = owned(who, webhook_id)
        if row["source"] == "config":
            raise ApiError(409, "configured", "this endpoint comes from the collector's command line; remove it there")
        hooks.delete(store().engine, webhook_id, who.actor, remote(request))
        return WebhookOut(**hooks.public(row))

    @app.post("/api/v1/webhooks/{webhook_id}/rotate", tags=["alerts"], response_model=WebhookOut, responses=responses)
    def rotate_webhook(request: Request, webhook_id: int = webhook_id_p,
                       finish: bool = Query(False, description="end the rotation: only the newest secret signs"),
                       who: Principal = admin):
        """Rotate the signing secret: a new one signs beside the old until the rotation is finished."""
        owned(who, webhook_id)
        secret = hooks.rotate(store().engine, webhook_id, who.actor, remote(request), finish)
        return WebhookOut(**hooks.public(hooks.get(store().engine, webhook_id)), secret=secret)

    @app.post("/api/v1/webhooks/{webhook_id}/enable", tags=["alerts"], response_model=WebhookOut, responses=responses)
    def enable_webhook(request: Request, webhook_id: int = webhook_id_p, who: Principal = admin):
        """Enable an endpoint again (after it answered 410 Gone, say)."""
        owned(who, webhook_id)
        hooks.set_enabled(store().engine, webhook_id, True, who.actor, remote=remote(request))
        return WebhookOut(**hooks.public(hooks.get(store().engine, webhook_id)))
