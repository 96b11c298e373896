"""Webhook endpoints and the Standard Webhooks signature (https://www.standardwebhooks.com).

Every delivery carries ``webhook-id`` (the same on every retry of it, so a receiver can drop
repeats), ``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under each of the endpoint's secrets,
space-separated, so a receiver that knows either the old or the new secret verifies a delivery
during a rotation. Secrets are ``whsec_`` + base64 of 32 random bytes; the HMAC key is the decoded
bytes, as the scheme defines.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
import time
from urllib.parse import urlsplit

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from .access import write_audit
from .db import webhooks

SECRET_PREFIX = "whsec_"
FORMATS = ("native", "slack", "alertmanager")
MAX_SECRETS = 2
_SYNC_LOCK = 0x6F707469 + 1  # beside migrate's lock key  # during a rotation: the new one and the one receivers may still hold


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """The signing primitive (checked against GitHub's published webhook test vector)."""
    return hmac.new(key, message, hashlib.sha256).digest()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac_sha256(_key(s), signed)).decode() for s in secrets)


def headers(secrets: list[str] | None, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    ts = int(time.time() if now is None else now)
    out = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
    if secrets:
        out["webhook-signature"] = signature(secrets, msg_id, ts, body)
    return out


def parse_spec(spec: str) -> tuple[str, str]:
    """``[FORMAT=]URL`` from the command line: (format, url); native when no format is named."""
    fmt, eq, url = spec.partition("=")
    if eq and fmt in FORMATS:
        return fmt, url.strip()
    return "native", spec.strip()


def valid_secret(secret: str) -> bool:
    if not secret.startswith(SECRET_PREFIX):
        return False
    try:
        return 24 <= len(_key(secret)) <= 64
    except ValueError:
        return False


def check_url(url: str) -> None:
    """Syntax only: the address is checked at every send (a name's address can change)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook URL is http:// or https:// with a host")
    if parts.username or parts.password:
        raise ValueError("a webhook URL carries no user or password (sign with a secret instead)")


# -- the table --------------------------------------------------------------------------------
def public(row) -> dict:
    r = dict(row)
    r["secrets"] = len(r.get("secrets") or [])
    return r


def create(engine: Engine, url: str, fmt: str, project: str | None, secret: str | None, actor: str,
           remote: str | None = None, signed: bool = True) -> tuple[dict, str | None]:
    """A new endpoint and its secret (shown once; made here unless given or ``signed`` is False)."""
    check_url(url)
    secret = secret or (new_secret() if signed else None)
    now = time.time()
    with engine.begin() as conn:
        wid = conn.execute(insert(webhooks).values(
            url=url, format=fmt, project=project, secrets=[secret] if secret else None, source="api",
            created_at=now, created_by=actor)).inserted_primary_key[0]
        write_audit(conn, actor, "webhook.create", project, wid, {"url": url, "format": fmt}, remote)
        row = conn.execute(select(webhooks).where(webhooks.c.id == wid)).mappings().one()
    return public(row), secret


def get(engine: Engine, webhook_id: int) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(webhooks).where(webhooks.c.id == webhook_id)).mappings().first()
    return None if row is None else dict(row)


def listing(engine: Engine, project: str | None) -> list[dict]:
    q = select(webhooks).order_by(webhooks.c.id)
    if project is not None:
        q = q.where(webhooks.c.project == project)
    with engine.connect() as conn:
        return [public(r) for r in conn.execute(q).mappings()]


def delete(engine: Engine, webhook_id: int, actor: str, remote: str | None = None) -> None:
    with engine.begin() as conn:
        row = _row(conn, webhooks.c.project, webhooks.c.url, webhook_id=webhook_id)
        conn.execute(webhooks.delete().where(webhooks.c.id == webhook_id))  # pending deliveries go with it
        write_audit(conn, actor, "webhook.delete", row.project, webhook_id, {"url": row.url}, remote)


def rotate(engine: Engine, webhook_id: int, actor: str, remote: str | None = None, finish: bool = False) -> str | None:
    """Start a rotation (a new secret signs beside the previous one) or, with ``finish``, end it
    (only the newest signs). Returns the new secret, or None when finishing."""
    with engine.begin() as conn:
        row = _row(conn, webhooks.c.project, webhooks.c.secrets, webhook_id=webhook_id)
        old = list(row.secrets or [])
        fresh = None if finish else new_secret()
        keep = old[:1] if finish else [fresh, *old][:MAX_SECRETS]
        conn.execute(update(webhooks).where(webhooks.c.id == webhook_id).values(secrets=keep or None))
        write_audit(conn, actor, "webhook.rotate_finish" if finish else "webhook.rotate", row.project, webhook_id,
                    None, remote)
    return fresh


def set_enabled(engine: Engine, webhook_id: int, enabled: bool, actor: str, reason: str | None = None,
                remote: str | None = None) -> None:
    with engine.begin() as conn:
        row = _row(conn, webhooks.c.project, webhook_id=webhook_id)
        conn.execute(update(webhooks).where(webhooks.c.id == webhook_id).values(
            disabled_at=None if enabled else time.time(), disabled_reason=None if enabled else reason))
        write_audit(conn, actor, "webhook.enable" if enabled else "webhook.disable", row.project, webhook_id,
                    None if enabled else {"reason": reason}, remote)


def _row(conn: Connection, *cols, webhook_id: int):
    row = conn.execute(select(*cols).where(webhooks.c.id == webhook_id)).first()
    if row is None:  # deleted meanwhile (another admin, another replica)
        raise LookupError(f"webhook {webhook_id}")
    return row


def targets_for(conn: Connection, project: str) -> list:
    """The enabled endpoints that receive a project's alerts."""
    return conn.execute(select(webhooks.c.id, webhooks.c.url).where(
        webhooks.c.disabled_at.is_(None),
        or_(webhooks.c.project.is_(None), webhooks.c.project == project)).order_by(webhooks.c.id)).all()


def sync_config(engine: Engine, configured: list[tuple[str, str]], secrets: list[str] | None) -> None:
    """Make the command line's endpoints (every project) rows of their own: each (format, url) given
    is enabled with the given secrets; a configured endpoint no longer given is disabled. Every
    replica must be started with the same endpoints."""
    now = time.time()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # replicas starting together: one after the other, no duplicates
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SYNC_LOCK})")
        have = {(r.format, r.url): r.id for r in conn.execute(
            select(webhooks.c.id, webhooks.c.format, webhooks.c.url).where(webhooks.c.source == "config"))}
        for key in configured:
            values = {"secrets": secrets or None, "disabled_at": None, "disabled_reason": None}
            if key in have:
                conn.execute(update(webhooks).where(webhooks.c.id == have[key]).values(**values))
            else:
                conn.execute(insert(webhooks).values(format=key[0], url=key[1], project=None, source="config",
                                                     created_at=now, created_by="config", **values))
        gone = [wid for key, wid in have.items() if key not in configured]
        if gone:
            conn.execute(update(webhooks).where(webhooks.c.id.in_(gone), webhooks.c.disabled_at.is_(None))
                         .values(disabled_at=now, disabled_reason="no longer configured"))
