"""Alerts: recording what the detectors emit (one page per incident), listing, acknowledging."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from optiscope.detect import AlertEvent

from ..storage.audit import write_audit
from ..storage.database import Database
from ..storage.errors import NotFound
from ..storage.runs import require_run
from ..storage.tables import alerts, runs
from .events import evidence_json, webhook_event
from .outbox import Outbox


class AlertStore:
    def __init__(self, db: Database):
        self.db = db

    # -- in a batch's transaction ------------------------------------------------------------
    def record(self, conn: Connection, run: Any, ev: AlertEvent, run_url: str, now: float) -> int:
        """Store one transition of the run's alerts and queue its deliveries; returns the alert's id
        (-1 for a resolution of an alert that is not firing)."""
        if ev.state == "firing":
            alert_id, inhibited = self._fire(conn, run.id, ev, now)
            started = now
        else:
            found = conn.execute(
                select(alerts.c.id, alerts.c.created_at, alerts.c.evidence)
                .where(
                    alerts.c.run_id == run.id,
                    alerts.c.rule == ev.rule,
                    alerts.c.series == ev.series,
                    alerts.c.rank == ev.rank,
                    alerts.c.state == "firing",
                )
                .order_by(alerts.c.id.desc())
            ).first()
            if found is None:
                return -1
            alert_id, started, evidence = found
            inhibited = (evidence or {}).get("inhibited_by")
            conn.execute(
                update(alerts)
                .where(alerts.c.id == alert_id)
                .values(state="resolved", resolved_at=now, resolved_step=ev.step)
            )
        if inhibited is None:  # an inhibited alert is stored and listed, but its incident was already paged
            Outbox.enqueue(conn, alert_id, run.project, webhook_event(alert_id, ev, run, run_url, now, started), now)
        return alert_id

    def _fire(self, conn: Connection, run_id: str, ev: AlertEvent, now: float) -> tuple[int, int | None]:
        evidence = evidence_json(ev)
        inhibited = self._inhibited_by(conn, run_id, ev)
        if inhibited is not None:
            evidence = {**(evidence or {}), "inhibited_by": inhibited}
        key: Any = conn.execute(
            alerts.insert().values(
                run_id=run_id,
                rule=ev.rule,
                severity=ev.severity,
                state="firing",
                series=ev.series,
                rank=ev.rank,
                step=ev.step,
                value=ev.value,
                message=ev.message,
                evidence=evidence,
                created_at=now,
            )
        ).inserted_primary_key
        return int(key[0]), inhibited

    @staticmethod
    def _inhibited_by(conn: Connection, run_id: str, ev: AlertEvent) -> int | None:
        """One page per incident: a paging alert that fires while another paging rule's alert is
        firing on the same run and rank is the same incident seen by a second rule. It is stored
        (with ``inhibited_by`` in its evidence) but not delivered. A non-finite value is always
        delivered: the run is dead, which is news even to whoever holds the first page."""
        if ev.severity != "page" or ev.rule == "non_finite":
            return None
        return conn.execute(
            select(alerts.c.id)
            .where(
                alerts.c.run_id == run_id,
                alerts.c.rank == ev.rank,
                alerts.c.state == "firing",
                alerts.c.severity == "page",
                alerts.c.rule != ev.rule,
            )
            .order_by(alerts.c.id)
        ).scalar()

    @staticmethod
    def firing_series(conn: Connection, run_id: str, rank: int) -> dict[str, set[str]]:
        """rule -> the series of its open incidents on one rank of a run."""
        out: dict[str, set[str]] = {}
        for rule, s in conn.execute(
            select(alerts.c.rule, alerts.c.series).where(
                alerts.c.run_id == run_id, alerts.c.rank == rank, alerts.c.state == "firing"
            )
        ).all():
            out.setdefault(rule, set()).add(s)
        return out

    # -- requests ----------------------------------------------------------------------------
    def list_alerts(
        self,
        run_id: str | None = None,
        state: str | None = None,
        limit: int = 1000,
        *,
        project: str | None = None,
        rule: str | None = None,
        severity: str | None = None,
        acknowledged: bool | None = None,
        before: int | None = None,
    ) -> list[dict]:
        """Alerts, newest first; ``before`` (an alert id) pages back from there."""
        q = (
            select(alerts, runs.c.project)
            .join(runs, runs.c.id == alerts.c.run_id)
            .order_by(alerts.c.id.desc())
            .limit(limit)
        )
        if run_id is not None:
            q = q.where(alerts.c.run_id == run_id)
        for col, want in (
            (alerts.c.state, state),
            (runs.c.project, project),
            (alerts.c.rule, rule),
            (alerts.c.severity, severity),
        ):
            if want is not None:
                q = q.where(col == want)
        if acknowledged is not None:
            q = q.where(alerts.c.acknowledged_at.is_not(None) if acknowledged else alerts.c.acknowledged_at.is_(None))
        if before is not None:
            q = q.where(alerts.c.id < before)
        with self.db.read() as conn:
            if run_id is not None:
                require_run(conn, run_id)
            return [dict(r) for r in conn.execute(q).mappings()]

    def get_alert(self, alert_id: int) -> dict:
        with self.db.read() as conn:
            row = (
                conn.execute(
                    select(alerts, runs.c.project)
                    .join(runs, runs.c.id == alerts.c.run_id)
                    .where(alerts.c.id == alert_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"alert {alert_id}")
        return dict(row)

    def acknowledge(self, alert_id: int, actor: str, note: str | None, remote: str | None = None) -> dict:
        """Mark an alert acknowledged (once: acknowledging again changes nothing) and audit it."""
        now = time.time()
        with self.db.write() as conn:
            row = conn.execute(
                select(alerts.c.acknowledged_at, runs.c.project)
                .join(runs, runs.c.id == alerts.c.run_id)
                .where(alerts.c.id == alert_id)
            ).first()
            if row is None:
                raise NotFound(f"alert {alert_id}")
            if row.acknowledged_at is None:
                conn.execute(
                    update(alerts)
                    .where(alerts.c.id == alert_id)
                    .values(acknowledged_at=now, acknowledged_by=actor[:200], ack_note=note)
                )
                write_audit(conn, actor, "alert.acknowledge", row.project, alert_id, {"note": note}, remote)
        return self.get_alert(alert_id)
