"""Run history: every read and write of the collector goes through this module."""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from optiscope import wire
from optiscope.detect import AlertEvent, Detector, default_detectors

from .db import alerts, batches, make_engine, outbox, points, runs, series


class NotFound(LookupError):
    pass


class Rejected(ValueError):
    """Input the store refuses; ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class IngestResult:
    duplicate: bool
    points: int = 0
    alerts: list[int] = field(default_factory=list)   # ids of alerts that fired or resolved
    fired: list[str] = field(default_factory=list)    # rule of each alert that fired


def _finite_json(x):
    """Config values go into a JSON column; PostgreSQL's JSON has no NaN, so spell them out."""
    if isinstance(x, float) and not math.isfinite(x):
        return wire.encode_value(x)
    if isinstance(x, dict):
        return {str(k): _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


class Store:
    def __init__(self, url: str, max_series_per_run: int = 10_000,
                 detectors: Callable[[], list[Detector]] | None = None):
        self.url = url
        self.engine: Engine = make_engine(url)
        self.max_series_per_run = max_series_per_run
        self._new_detectors = detectors or default_detectors
        self._insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)
        # Detector state per run, restored from the firing alerts the first time a run is seen.
        self._detectors: dict[str, list[Detector]] = {}
        # Batches of one run are ingested one at a time (detector order); striped locks keep that
        # bounded in memory however many runs a collector sees.
        self._run_locks = [threading.Lock() for _ in range(64)]

    def close(self) -> None:
        self.engine.dispose()

    # -- runs --------------------------------------------------------------------------------
    def upsert_run(self, run_id: str, project: str, name: str, config: dict, host: str | None) -> dict:
        now = time.time()
        with self.engine.begin() as conn:
            stmt = self._insert(runs).values(id=run_id, project=project, name=name, status="running",
                                             config=_finite_json(config), host=host, created_at=now,
                                             updated_at=now)
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        if row["project"] != project:
            raise Rejected("run_project_mismatch", f"run {run_id} belongs to project {row['project']!r}")
        return dict(row)

    def finish_run(self, run_id: str, status: str) -> dict:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(status=status, finished_at=now, updated_at=now))
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise NotFound(run_id)
        # A finished run sends no more batches (a late one restores the state from the store).
        self._detectors.pop(run_id, None)
        return dict(row)

    def list_runs(self, project: str | None = None, status: str | None = None, limit: int = 100) -> list[dict]:
        q = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
        if project:
            q = q.where(runs.c.project == project)
        if status:
            q = q.where(runs.c.status == status)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def get_run(self, run_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                raise NotFound(run_id)
            last = conn.execute(select(series.c.name, series.c.last_step, series.c.last_value)
                                .where(series.c.run_id == run_id).order_by(series.c.name)).all()
            counts = conn.execute(select(alerts.c.state, func.count()).where(alerts.c.run_id == run_id)
                                  .group_by(alerts.c.state)).all()
        out = dict(row)
        out["last"] = {n: {"step": s, "value": v} for n, s, v in last if s is not None}
        out["alerts"] = {state: n for state, n in counts}
        return out

    # -- series ------------------------------------------------------------------------------
    def list_series(self, run_id: str) -> list[dict]:
        self.get_run_row(run_id)
        with self.engine.connect() as conn:
            rows = conn.execute(select(series.c.name, series.c.last_step, series.c.last_value)
                                .where(series.c.run_id == run_id).order_by(series.c.name)).all()
        return [{"name": n, "last_step": s, "last_value": v} for n, s, v in rows]

    def get_run_row(self, run_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise NotFound(run_id)
        return dict(row)

    def get_series(self, run_id: str, name: str, rank: int | None = None, start: int | None = None,
                   end: int | None = None, limit: int = 100_000) -> tuple[list[int], list[int], list[float], bool]:
        """(steps, ranks, values, truncated) ordered by step then rank, at most ``limit`` points."""
        with self.engine.connect() as conn:
            sid = conn.execute(select(series.c.id).where(series.c.run_id == run_id, series.c.name == name)).scalar()
            if sid is None:
                self.get_run_row(run_id)  # 404 for the run rather than the series when both are missing
                raise NotFound(f"{run_id}/{name}")
            q = select(points.c.step, points.c.rank, points.c.value).where(points.c.series_id == sid)
            if rank is not None:
                q = q.where(points.c.rank == rank)
            if start is not None:
                q = q.where(points.c.step >= start)
            if end is not None:
                q = q.where(points.c.step <= end)
            rows = conn.execute(q.order_by(points.c.step, points.c.rank).limit(limit + 1)).all()
        truncated = len(rows) > limit
        rows = rows[:limit]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], truncated

    # -- ingest ------------------------------------------------------------------------------
    def _run_lock(self, run_id: str) -> threading.Lock:
        return self._run_locks[hash(run_id) % len(self._run_locks)]

    def _detectors_for(self, conn: Connection, run_id: str) -> list[Detector]:
        dets = self._detectors.get(run_id)
        if dets is None:
            dets = self._new_detectors()
            firing = conn.execute(select(alerts.c.rule, alerts.c.rank, alerts.c.series)
                                  .where(alerts.c.run_id == run_id, alerts.c.state == "firing")).all()
            for d in dets:
                if hasattr(d, "firing"):
                    d.firing.update((rk, s) for rule, rk, s in firing if rule == getattr(d, "rule", None))
            self._detectors[run_id] = dets
        return dets

    def ingest(self, batch: wire.Batch, webhook_targets: Iterable[str] = (), run_url: str = "") -> IngestResult:
        """Store one batch atomically: points, series catalog, detector alerts and their outbox rows."""
        with self._run_lock(batch.run):
            try:
                with self.engine.begin() as conn:
                    return self._ingest(conn, batch, list(webhook_targets), run_url)
            except Exception:
                self._detectors.pop(batch.run, None)  # state may have moved past a rolled-back batch
                raise

    def _ingest(self, conn: Connection, batch: wire.Batch, targets: list[str], run_url: str) -> IngestResult:
        run = conn.execute(select(runs.c.id, runs.c.project, runs.c.name).where(runs.c.id == batch.run)).first()
        if run is None:
            raise NotFound(batch.run)
        now = time.time()
        key = self._insert(batches).values(run_id=batch.run, rank=batch.rank, seq=batch.seq, received_at=now)
        # RETURNING rather than rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
        if conn.execute(key.on_conflict_do_nothing().returning(batches.c.seq)).first() is None:
            return IngestResult(duplicate=True)
        ids = self._series_ids(conn, batch)
        newest: dict[str, tuple[int, float]] = {}
        rows: dict[tuple[int, int], float] = {}  # (series, step) -> value; the last write in a batch wins
        for step, _t, values in batch.records:
            for name, v in values.items():
                rows[(ids[name], step)] = v
                if name not in newest or step >= newest[name][0]:
                    newest[name] = (step, v)
        if rows:
            ins = self._insert(points)
            conn.execute(ins.on_conflict_do_update(index_elements=["series_id", "rank", "step"],
                                                   set_={"value": ins.excluded.value}),
                         [{"series_id": s, "rank": batch.rank, "step": st, "value": v} for (s, st), v in rows.items()])
            conn.execute(update(series).where(series.c.id == bindparam("sid"),
                                              or_(series.c.last_step.is_(None), series.c.last_step <= bindparam("st")))
                         .values(last_step=bindparam("st"), last_value=bindparam("v")),
                         [{"sid": ids[n], "st": s, "v": v} for n, (s, v) in newest.items()])
        conn.execute(update(runs).where(runs.c.id == batch.run).values(updated_at=now))
        result = IngestResult(duplicate=False, points=len(rows))
        for step, _t, values in batch.records:
            for det in self._detectors_for(conn, batch.run):
                for ev in det.update(step, values, batch.rank):
                    result.alerts.append(self._record_alert(conn, run, ev, targets, run_url, now))
                    if ev.state == "firing":
                        result.fired.append(ev.rule)
        return result

    def _series_ids(self, conn: Connection, batch: wire.Batch) -> dict[str, int]:
        names = {n for _, _, values in batch.records for n in values}
        have = dict(conn.execute(select(series.c.name, series.c.id).where(series.c.run_id == batch.run)).all())
        missing = names - have.keys()
        if missing:
            if len(have) + len(missing) > self.max_series_per_run:
                raise Rejected("too_many_series", f"run {batch.run} would have {len(have) + len(missing)} series; "
                                                  f"the limit is {self.max_series_per_run}")
            conn.execute(self._insert(series).on_conflict_do_nothing(),
                         [{"run_id": batch.run, "name": n} for n in sorted(missing)])
            have = dict(conn.execute(select(series.c.name, series.c.id).where(series.c.run_id == batch.run)).all())
        return have

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

    def list_alerts(self, run_id: str | None = None, state: str | None = None, limit: int = 1000) -> list[dict]:
        q = (select(alerts, runs.c.project).join(runs, runs.c.id == alerts.c.run_id)
             .order_by(alerts.c.id.desc()).limit(limit))
        if run_id is not None:
            self.get_run_row(run_id)
            q = q.where(alerts.c.run_id == run_id)
        if state:
            q = q.where(alerts.c.state == state)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

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

    # -- metrics -----------------------------------------------------------------------------
    def active_runs_latest(self, since: float, max_runs: int, names: Iterable[str]) -> list[dict]:
        """Runs still running or updated since ``since`` (newest first, at most ``max_runs``),
        with the last value of each of ``names`` and the number of firing alerts."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs.c.id, runs.c.project, runs.c.name, runs.c.updated_at)
                                .where(or_(runs.c.status == "running", runs.c.updated_at >= since))
                                .order_by(runs.c.updated_at.desc()).limit(max_runs)).all()
            ids = [r.id for r in rows]
            if not ids:
                return []
            last = conn.execute(select(series.c.run_id, series.c.name, series.c.last_step, series.c.last_value)
                                .where(series.c.run_id.in_(ids), series.c.name.in_(list(names)),
                                       series.c.last_step.is_not(None))).all()
            firing = dict(conn.execute(select(alerts.c.run_id, func.count())
                                       .where(alerts.c.run_id.in_(ids), alerts.c.state == "firing")
                                       .group_by(alerts.c.run_id)).all())
        out = {r.id: {"run_id": r.id, "project": r.project, "name": r.name, "updated_at": r.updated_at,
                      "values": {}, "step": None, "firing": firing.get(r.id, 0)} for r in rows}
        for run_id, name, step, value in last:
            o = out[run_id]
            o["values"][name] = value
            o["step"] = step if o["step"] is None else max(o["step"], step)
        return list(out.values())


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

