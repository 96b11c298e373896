"""Webhook endpoints as rows: created, listed, rotated, disabled and deleted through the API
(audited), or given on the collector's command line (synced at start). Signing is ``signing``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from ..storage.audit import write_audit
from ..storage.tables import webhooks
from .formats import FORMATS
from .signing import MAX_SECRETS, new_secret

_SYNC_LOCK = 0x6F707469 + 1  # beside migrate's lock key


def parse_spec(spec: str) -> tuple[str, str]:
    """``[FORMAT=]URL`` from the command line: (format, url); native when no format is named."""
    fmt, eq, url = spec.partition("=")
    if eq and fmt in FORMATS:
        return fmt, url.strip()
    return "native", spec.strip()


def check_url(url: str) -> None:
    """Syntax only: the address is checked at every send (a name's address can change)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook URL is http:// or https:// with a host")
    if parts.username or parts.password:
        raise ValueError("a webhook URL carries no user or password (sign with a secret instead)")
    try:
        port = parts.port  # urllib checks the range when asked
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("a webhook URL's port is from 1 to 65535")


# -- the table --------------------------------------------------------------------------------
def public(row) -> dict:
    r = dict(row)
    r["secrets"] = len(r.get("secrets") or [])
    return r


def create(
    engine: Engine,
    url: str,
    fmt: str,
    project: str | None,
    secret: str | None,
    actor: str,
    remote: str | None = None,
    signed: bool = True,
) -> tuple[dict, str | None]:
    """A new endpoint and its secret (shown once; made here unless given or ``signed`` is False)."""
    check_url(url)
    secret = secret or (new_secret() if signed else None)
    now = time.time()
    with engine.begin() as conn:
        key: Any = conn.execute(
            insert(webhooks).values(
                url=url,
                format=fmt,
                project=project,
                secrets=[secret] if secret else None,
                source="api",
                created_at=now,
                created_by=actor,
            )
        ).inserted_primary_key
        wid = key[0]
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
        write_audit(
            conn, actor, "webhook.rotate_finish" if finish else "webhook.rotate", row.project, webhook_id, None, remote
        )
    return fresh


def set_enabled(
    engine: Engine, webhook_id: int, enabled: bool, actor: str, reason: str | None = None, remote: str | None = None
) -> None:
    with engine.begin() as conn:
        row = _row(conn, webhooks.c.project, webhook_id=webhook_id)
        conn.execute(
            update(webhooks)
            .where(webhooks.c.id == webhook_id)
            .values(disabled_at=None if enabled else time.time(), disabled_reason=None if enabled else reason)
        )
        write_audit(
            conn,
            actor,
            "webhook.enable" if enabled else "webhook.disable",
            row.project,
            webhook_id,
            None if enabled else {"reason": reason},
            remote,
        )


def _row(conn: Connection, *cols, webhook_id: int):
    row = conn.execute(select(*cols).where(webhooks.c.id == webhook_id)).first()
    if row is None:  # deleted meanwhile (another admin, another replica)
        raise LookupError(f"webhook {webhook_id}")
    return row


def targets_for(conn: Connection, project: str) -> Sequence[Any]:
    """The enabled endpoints that receive a project's alerts."""
    return conn.execute(
        select(webhooks.c.id, webhooks.c.url)
        .where(webhooks.c.disabled_at.is_(None), or_(webhooks.c.project.is_(None), webhooks.c.project == project))
        .order_by(webhooks.c.id)
    ).all()


def sync_config(engine: Engine, configured: list[tuple[str, str]], secrets: list[str] | None) -> None:
    """Make the command line's endpoints (every project) rows of their own: each (format, url) given
    is enabled with the given secrets; a configured endpoint no longer given is disabled. Every
    replica must be started with the same endpoints."""
    now = time.time()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # replicas starting together: one after the other, no duplicates
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SYNC_LOCK})")
        have = {
            (r.format, r.url): r.id
            for r in conn.execute(
                select(webhooks.c.id, webhooks.c.format, webhooks.c.url).where(webhooks.c.source == "config")
            )
        }
        for key in configured:
            values = {"secrets": secrets or None, "disabled_at": None, "disabled_reason": None}
            if key in have:
                conn.execute(update(webhooks).where(webhooks.c.id == have[key]).values(**values))
            else:
                conn.execute(
                    insert(webhooks).values(
                        format=key[0],
                        url=key[1],
                        project=None,
                        source="config",
                        created_at=now,
                        created_by="config",
                        **values,
                    )
                )
        gone = [wid for key, wid in have.items() if key not in configured]
        if gone:
            conn.execute(
                update(webhooks)
                .where(webhooks.c.id.in_(gone), webhooks.c.disabled_at.is_(None))
                .values(disabled_at=now, disabled_reason="no longer configured")
            )
