"""The webhook outbox: a delivery row per alert transition and endpoint, written in the alert's
transaction (a crash between detection and delivery loses nothing), claimed and marked by the
dispatcher."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from optiscope.detect import AlertEvent

from ..storage.database import Database
from ..storage.tables import alerts, outbox, runs, webhooks
from . import endpoints
from .events import webhook_event


class Outbox:
    def __init__(self, db: Database):
        self.db = db

    @staticmethod
    def enqueue(conn: Connection, alert_id: int, project: str, event: dict, now: float) -> None:
        """One delivery of ``event`` to each enabled endpoint that receives the project's alerts."""
        targets = endpoints.targets_for(conn, project)
        if targets:
            payload = json.dumps(event, allow_nan=False)
            conn.execute(
                outbox.insert(),
                [
                    {
                        "alert_id": alert_id,
                        "webhook_id": t.id,
                        "target": t.url,
                        "msg_id": f"msg_{secrets.token_hex(12)}",
                        "payload": payload,
                        "attempts": 0,
                        "next_attempt_at": now,
                    }
                    for t in targets
                ],
            )

    def due_deliveries(self, now: float, limit: int = 100) -> list[dict]:
        """Deliveries due now, with their endpoint's format, secrets and state (a delivery written
        before endpoints were rows has none: native, unsigned)."""
        q = (
            select(
                outbox.c.id,
                outbox.c.target,
                outbox.c.payload,
                outbox.c.attempts,
                outbox.c.msg_id,
                outbox.c.webhook_id,
                webhooks.c.format,
                webhooks.c.secrets,
                webhooks.c.disabled_at,
            )
            .select_from(outbox.outerjoin(webhooks, webhooks.c.id == outbox.c.webhook_id))
            .where(outbox.c.delivered_at.is_(None), outbox.c.next_attempt_at <= now)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def mark_delivery(self, delivery_id: int, ok: bool, error: str | None, next_attempt_at: float) -> None:
        values = (
            {"delivered_at": time.time(), "last_error": None}
            if ok
            else {"last_error": (error or "")[:500], "next_attempt_at": next_attempt_at}
        )
        with self.db.engine.begin() as conn:
            conn.execute(
                update(outbox).where(outbox.c.id == delivery_id).values(attempts=outbox.c.attempts + 1, **values)
            )

    def alertmanager_endpoints(self) -> list[dict]:
        q = select(webhooks.c.id, webhooks.c.url, webhooks.c.project, webhooks.c.secrets).where(
            webhooks.c.format == "alertmanager", webhooks.c.disabled_at.is_(None)
        )
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def firing_events(self, project: str | None, run_url: Callable[[str], str], limit: int = 1000) -> list[dict]:
        """The native event of every firing alert of a running run (of one project, or all), newest
        first, as when it fired. An ended run sends nothing more that could resolve its alerts, so
        they are left to expire in Alertmanager rather than be kept alive for ever."""
        q = (
            select(alerts, runs.c.project, runs.c.name.label("run_name"))
            .join(runs, runs.c.id == alerts.c.run_id)
            .where(alerts.c.state == "firing", runs.c.status == "running")
            .order_by(alerts.c.id.desc())
            .limit(limit)
        )
        if project is not None:
            q = q.where(runs.c.project == project)
        with self.db.read() as conn:
            rows = conn.execute(q).mappings().all()
        return [
            webhook_event(
                r["id"],
                _event(r),
                SimpleNamespace(id=r["run_id"], project=r["project"], name=r["run_name"]),
                run_url(r["run_id"]),
                r["created_at"],
                r["created_at"],
            )
            for r in rows
        ]


def _event(r: Any) -> AlertEvent:
    return AlertEvent(
        r["rule"],
        r["severity"],
        "firing",
        r["series"],
        r["step"],
        r["rank"],
        r["value"],
        r["message"],
        r["evidence"] or {},
    )
