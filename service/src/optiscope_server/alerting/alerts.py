"""Alerts and their webhook outbox: recording what the detectors emit, listing, acknowledging,
and the dispatcher's queue.

Mixed into ``Store``: it uses the store's engine, writer lock and ``get_run_row``.
"""
from __future__ import annotations

import json
import secrets
import time
from types import SimpleNamespace

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from optiscope import wire
from optiscope.detect import AlertEvent

from . import hooks
from .access import write_audit
from .db import alerts, outbox, runs, webhooks
from .errors import NotFound


class AlertStore:
    # -- alerts ------------------------------------------------------------------------------
    def _record_alert(self, conn: Connection, run, ev: AlertEvent, run_url: str, now: float) -> int:
        if ev.state == "firing":
            evidence = _evidence(ev)
            inhibited = self._inhibited_by(conn, run.id, ev)
            if inhibited is not None:
                evidence = {**(evidence or {}), "inhibited_by": inhibited}
            alert_id = conn.execute(alerts.insert().values(
                run_id=run.id, rule=ev.rule, severity=ev.severity, state="firing", series=ev.series,
                rank=ev.rank, step=ev.step, value=ev.value, message=ev.message, evidence=evidence,
                created_at=now)).inserted_primary_key[0]
            started = now
        else:
            found = conn.execute(select(alerts.c.id, alerts.c.created_at, alerts.c.evidence).where(
                alerts.c.run_id == run.id, alerts.c.rule == ev.rule, alerts.c.series == ev.series,
                alerts.c.rank == ev.rank, alerts.c.state == "firing").order_by(alerts.c.id.desc())).first()
            if found is None:
                return -1
            alert_id, started, evidence = found
            inhibited = (evidence or {}).get("inhibited_by")
            conn.execute(update(alerts).where(alerts.c.id == alert_id)
                         .values(state="resolved", resolved_at=now, resolved_step=ev.step))
        if inhibited is not None:
            return alert_id  # stored and listed, but the incident was already paged: nothing is sent
        payload = json.dumps(webhook_event(alert_id, ev, run, run_url, now, started), allow_nan=False)
        targets = hooks.targets_for(conn, run.project)
        if targets:
            conn.execute(outbox.insert(), [{"alert_id": alert_id, "webhook_id": t.id, "target": t.url,
                                            "msg_id": f"msg_{secrets.token_hex(12)}", "payload": payload,
                                            "attempts": 0, "next_attempt_at": now} for t in targets])
        return alert_id

    @staticmethod
    def _inhibited_by(conn: Connection, run_id: str, ev: AlertEvent) -> int | None:
        """One page per incident: a paging alert that fires while another paging rule's alert is
        firing on the same run and rank is the same incident seen by a second rule. It is stored
        (with ``inhibited_by`` in its evidence) but not delivered. A non-finite value is always
        delivered: the run is dead, which is news even to whoever holds the first page."""
        if ev.severity != "page" or ev.rule == "non_finite":
            return None
        return conn.execute(select(alerts.c.id).where(
            alerts.c.run_id == run_id, alerts.c.rank == ev.rank, alerts.c.state == "firing",
            alerts.c.severity == "page", alerts.c.rule != ev.rule).order_by(alerts.c.id)).scalar()

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
        """Deliveries due now, with their endpoint's format, secrets and state (a delivery written
        before endpoints were rows has none: native, unsigned)."""
        q = (select(outbox.c.id, outbox.c.target, outbox.c.payload, outbox.c.attempts, outbox.c.msg_id,
                    outbox.c.webhook_id, webhooks.c.format, webhooks.c.secrets, webhooks.c.disabled_at)
             .select_from(outbox.outerjoin(webhooks, webhooks.c.id == outbox.c.webhook_id))
             .where(outbox.c.delivered_at.is_(None), outbox.c.next_attempt_at <= now)
             .order_by(outbox.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def alertmanager_endpoints(self) -> list[dict]:
        q = select(webhooks.c.id, webhooks.c.url, webhooks.c.project, webhooks.c.secrets).where(
            webhooks.c.format == "alertmanager", webhooks.c.disabled_at.is_(None))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def firing_events(self, project: str | None, run_url, limit: int = 1000) -> list[dict]:
        """The native event of every firing alert of a running run (of one project, or all), newest
        first, as when it fired. An ended run sends nothing more that could resolve its alerts, so
        they are left to expire in Alertmanager rather than be kept alive for ever."""
        q = (select(alerts, runs.c.project, runs.c.name.label("run_name")).join(runs, runs.c.id == alerts.c.run_id)
             .where(alerts.c.state == "firing", runs.c.status == "running").order_by(alerts.c.id.desc()).limit(limit))
        if project is not None:
            q = q.where(runs.c.project == project)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [webhook_event(r["id"], AlertEvent(r["rule"], r["severity"], "firing", r["series"], r["step"], r["rank"],
                                                  r["value"], r["message"], r["evidence"] or {}),
                              SimpleNamespace(id=r["run_id"], project=r["project"], name=r["run_name"]),
                              run_url(r["run_id"]), r["created_at"], r["created_at"]) for r in rows]

    def mark_delivery(self, delivery_id: int, ok: bool, error: str | None, next_attempt_at: float) -> None:
        values = ({"delivered_at": time.time(), "last_error": None} if ok else
                  {"last_error": (error or "")[:500], "next_attempt_at": next_attempt_at})
        with self.engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.id == delivery_id)
                         .values(attempts=outbox.c.attempts + 1, **values))


def _evidence(ev: AlertEvent) -> dict | None:
    """The event's evidence as strict JSON: non-finite numbers spelled as the wire spells them,
    anything else that is not JSON as its string."""
    def clean(x):
        if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
            return x
        if isinstance(x, float):
            return wire.encode_value(x)
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return str(x)
    return clean(dict(ev.evidence)) if ev.evidence else None


def webhook_event(alert_id: int, ev: AlertEvent, run, run_url: str, now: float, started: float) -> dict:
    """The native JSON event POSTed to webhooks (documented in the README)."""
    alert = {"id": alert_id, "rule": ev.rule, "severity": ev.severity, "state": ev.state, "series": ev.series,
             "step": ev.step, "rank": ev.rank, "value": wire.encode_value(ev.value), "message": ev.message,
             "evidence": _evidence(ev) or {}, "created_at": started}
    if ev.state == "resolved":
        alert["resolved_at"] = now
    return {
        "type": f"alert.{ev.state}",
        "alert": alert,
        "run": {"id": run.id, "project": run.project, "name": run.name, "url": run_url},
        "time": now,
    }
