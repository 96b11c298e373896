"""The newest points: of each series (run summaries, series catalogs), and of the runs a
Prometheus scrape exports (with each rank's newest SDK counters). Every read goes through the chunk
index, so its cost does not grow with the length of a run."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, or_, select, true
from sqlalchemy.engine import Connection

from .database import Database
from .tables import alerts, chunks, run_ranks, runs, series


def latest(*where: Any, outer: bool = False) -> Any:
    """(run_id, name, step, value) of the newest point of each series matching ``where``: the chunk
    with the highest step_max (the newest of those on a tie) found through the index, per series.
    ``outer`` keeps series without a point (step and value None)."""
    newest = (
        select(chunks.c.id)
        .where(chunks.c.series_id == series.c.id)
        .order_by(chunks.c.step_max.desc(), chunks.c.id.desc())
        .limit(1)
        .correlate(series)
        .scalar_subquery()
    )
    return (
        select(series.c.run_id, series.c.name, chunks.c.step_max, chunks.c.last_value)
        .select_from(series.join(chunks, chunks.c.id == newest, isouter=outer))
        .where(*where)
    )


class LatestValues:
    """What /metrics exports, read from the store on each scrape (so every replica agrees)."""

    #: ``_latest_per_rank`` reads this many chunks per rank of the run, and never more than the cap.
    RANK_WINDOW, RANK_WINDOW_MAX = 4, 64

    def __init__(self, db: Database):
        self.db = db

    def active_runs_latest(
        self, since: float, max_runs: int, names: Iterable[str], per_rank: Iterable[str] = ()
    ) -> list[dict]:
        """Runs still running or updated since ``since`` (newest first, at most ``max_runs``),
        with the last value of each of ``names``, the number of firing alerts, and for each of
        ``per_rank`` the last value of each rank (``ranks``: {name: {rank: value}}, see
        ``_latest_per_rank``)."""
        per_rank = list(per_rank)
        with self.db.read() as conn:
            rows = conn.execute(
                select(runs.c.id, runs.c.project, runs.c.name, runs.c.updated_at)
                .where(or_(runs.c.status == "running", runs.c.updated_at >= since))
                .order_by(runs.c.updated_at.desc())
                .limit(max_runs)
            ).all()
            ids = [r.id for r in rows]
            if not ids:
                return []
            last = conn.execute(latest(series.c.run_id.in_(ids), series.c.name.in_(list(names)))).all()
            firing: dict[str, int] = dict(
                conn.execute(
                    select(alerts.c.run_id, func.count())
                    .where(alerts.c.run_id.in_(ids), alerts.c.state == "firing")
                    .group_by(alerts.c.run_id)
                ).all()
            )
            ranked = self._latest_per_rank(conn, ids, per_rank) if per_rank else []
        out = {
            r.id: {
                "run_id": r.id,
                "project": r.project,
                "name": r.name,
                "updated_at": r.updated_at,
                "values": {},
                "step": None,
                "firing": firing.get(r.id, 0),
                "ranks": {},
            }
            for r in rows
        }
        for run_id, name, step, value in last:
            o = out[run_id]
            o["values"][name] = value
            o["step"] = step if o["step"] is None else max(o["step"], step)
        for run_id, name, rank, value in ranked:
            out[run_id]["ranks"].setdefault(name, {})[rank] = value
        return list(out.values())

    def _latest_per_rank(self, conn: Connection, ids: list[str], names: list[str]) -> list[tuple]:
        """(run_id, name, rank, value): the newest point of each rank in the series ``names`` of the
        runs ``ids``, for the ranks found among the newest RANK_WINDOW x (ranks of the run) chunks of
        the series, at most RANK_WINDOW_MAX. The chunk index is by step, not by rank, so a fixed
        window read through it keeps a scrape's cost bounded however long the run (a rank's newest
        chunk could otherwise lie anywhere); a rank left out is one that has not reported while the
        others filled the window (a rank that stopped early, or one that reports far less often)."""
        counts: dict[str, int] = dict(
            conn.execute(
                select(run_ranks.c.run_id, func.count()).where(run_ranks.c.run_id.in_(ids)).group_by(run_ranks.c.run_id)
            ).all()
        )
        by_window: dict[int, list[str]] = collections.defaultdict(list)
        for rid in ids:
            by_window[min(self.RANK_WINDOW_MAX, self.RANK_WINDOW * max(1, counts.get(rid, 0)))].append(rid)
        newest: dict[tuple, tuple] = {}
        for window, group in by_window.items():
            for run_id, name, rank, step, cid, value in conn.execute(self._window_query(group, names, window)):
                key = (run_id, name, rank)
                if key not in newest or (step, cid) > newest[key][0]:
                    newest[key] = ((step, cid), value)
        return [(*key, value) for key, (_, value) in newest.items()]

    def _window_query(self, group: list[str], names: list[str], window: int) -> Any:
        """The newest ``window`` chunks of each series: LATERAL on PostgreSQL, a correlated IN on
        SQLite (which has no LATERAL); both read each series' window backwards through
        ix_chunks_series_step."""
        where = (series.c.run_id.in_(group), series.c.name.in_(names))
        if self.db.dialect == "postgresql":
            top = (
                select(chunks.c.rank, chunks.c.step_max, chunks.c.id, chunks.c.last_value)
                .where(chunks.c.series_id == series.c.id)
                .order_by(chunks.c.step_max.desc(), chunks.c.id.desc())
                .limit(window)
                .lateral("top")
            )
            return (
                select(series.c.run_id, series.c.name, top.c.rank, top.c.step_max, top.c.id, top.c.last_value)
                .select_from(series.join(top, true()))
                .where(*where)
            )
        w = chunks.alias("w")
        top_ids = (
            select(w.c.id)
            .where(w.c.series_id == series.c.id)
            .order_by(w.c.step_max.desc(), w.c.id.desc())
            .limit(window)
        )
        return (
            select(series.c.run_id, series.c.name, chunks.c.rank, chunks.c.step_max, chunks.c.id, chunks.c.last_value)
            .select_from(series.join(chunks, chunks.c.id.in_(top_ids)))
            .where(*where)
        )
