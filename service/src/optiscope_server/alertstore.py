"""Alerts and their webhook outbox: recording what the detectors emit, listing, acknowledging,
and the dispatcher's queue.

Mixed into ``Store``: it uses the store's engine, writer lock and ``get_run_row``.
"""
from __future__ import annotations

import json
import time

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from optiscope import wire
from optiscope.detect import AlertEvent

from .access import write_audit
from .db import alerts, outbox, runs
from .errors import NotFound


class AlertStore:
    # -- alerts ------------------------------------------------------------------------------
    def _record_alert(self, conn: Connection, run, ev: AlertEvent, targets: list[str], run_url: str,
                      now: float) -> int:
        if ev.state == "firing":
            alert_id = conn.execute(alerts.insert().values(
                run_id=run.id, rule=ev.rule, severity=ev.severity, state="firing", series=ev.series,
                rank=ev.rank, step=ev.step, value=ev.value, message=ev.message, created_at=now)).inserted_primary_key[0]
        else:
            alert_id = conn.execute(select(alerts.c.id).where(
                alerts.c.run_id == run.id, alerts.c.rule == ev.rule, alerts.c.series == ev.series,
                alerts.c.rank == ev.rank, alerts.c.state == "firing").order_by(alerts.c.id.desc())).scalar()
            if alert_id is None:
                return -1
            conn.execute(update(alerts).where(alerts.c.id == alert_id)
                         .values(state="resolved", resolved_at=now, resolved_step=ev.step))
        payload = json.dumps(webhook_event(alert_id, ev, run, run_url, now), allow_nan=False)
        if targets:
            conn.execute(outbox.insert(), [{"alert_id": alert_id, "target": t, "payload": payload, "attempts": 0,
                                            "next_attempt_at": now} for t in targets])
        return alert_id

    def list_alerts(self, run_id: str | None = None, state: str | None = None, limit: int = 1000, *,
                    project: str | None = None, rule: str | None = None, severity: str | None = None,
                    acknowledged: bool | None = None, before: int | None = None) -> list[dict]:
        """Alerts, newest first; ``before`` (an alert id) pages back from there."""
        q = (select(alerts, runs.c.project).join(runs, runs.c.id == alerts.c.run_id)
             .order_by(alerts.c.id.desc()).limit(limit))
        if run_id is not None:
            self.get_run_row(run_id)
            q = q.where(alerts.c.run_id == run_id)
        for col, want in ((alerts.c.state, state), (runs.c.project, project), (alerts.c.rule, rule),
                          (alerts.c.severity, severity)):
            if want is not None:
                q = q.where(col == want)
        if acknowledged is not None:
            q = q.where(alerts.c.acknowledged_at.is_not(None) if acknowledged else alerts.c.acknowledged_at.is_(None))
        if before is not None:
            q = q.where(alerts.c.id < before)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def get_alert(self, alert_id: int) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(alerts, runs.c.project).join(runs, runs.c.id == alerts.c.run_id)
                               .where(alerts.c.id == alert_id)).mappings().first()
        if row is None:
            raise NotFound(f"alert {alert_id}")
        return dict(row)

    def acknowledge(self, alert_id: int, actor: str, note: str | None, remote: str | None = None) -> dict:
        """Mark an alert acknowledged (once: acknowledging again changes nothing) and audit it."""
        now = time.time()
        with self._writer, self.engine.begin() as conn:
            row = conn.execute(select(alerts.c.acknowledged_at, runs.c.project)
                               .join(runs, runs.c.id == alerts.c.run_id).where(alerts.c.id == alert_id)).first()
            if row is None:
                raise NotFound(f"alert {alert_id}")
            if row.acknowledged_at is None:
                conn.execute(update(alerts).where(alerts.c.id == alert_id).values(
                    acknowledged_at=now, acknowledged_by=actor[:200], ack_note=note))
                write_audit(conn, actor, "alert.acknowledge", row.project, alert_id, {"note": note}, remote)
        return self.get_alert(alert_id)

    # -- outbox ------------------------------------------------------------------------------
    def due_deliveries(self, now: float, limit: int = 100) -> list[dict]:
        q = (select(outbox.c.id, outbox.c.target, outbox.c.payload, outbox.c.attempts)
             .where(outbox.c.delivered_at.is_(None), outbox.c.next_attempt_at <= now)
             .order_by(outbox.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def mark_delivery(self, delivery_id: int, ok: bool, error: str | None, next_attempt_at: float) -> None:
        values = ({"delivered_at": time.time(), "last_error": None} if ok else
                  {"last_error": (error or "")[:500], "next_attempt_at": next_attempt_at})
        with self.engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.id == delivery_id)
                         .values(attempts=outbox.c.attempts + 1, **values))


def webhook_event(alert_id: int, ev: AlertEvent, run, run_url: str, now: float) -> dict:
    """The native JSON event POSTed to webhooks (documented in the README)."""
    return {
        "type": f"alert.{ev.state}",
        "alert": {"id": alert_id, "rule": ev.rule, "severity": ev.severity, "state": ev.state,
                  "series": ev.series, "step": ev.step, "rank": ev.rank, "value": wire.encode_value(ev.value),
                  "message": ev.message},
        "run": {"id": run.id, "project": run.project, "name": run.name, "url": run_url},
        "time": now,
    }
