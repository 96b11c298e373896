"""Runs: registration, listing, one run's detail, deletion (of a run or of a project's runs)."""

from __future__ import annotations

import collections
import contextlib
import json
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Text, cast, exists, func, select, tuple_, update
from sqlalchemy.engine import Connection

from optiscope import wire

from .audit import write_audit
from .database import Database
from .errors import NotFound, Rejected
from .latest import latest
from .projects import ensure_project
from .tables import alerts, projects, run_ranks, run_tags, runs, series


def require_run(conn: Connection, run_id: str) -> None:
    """NotFound (a 404) unless the run exists."""
    if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
        raise NotFound(run_id)


def settle(conn: Connection, run_id: str, now: float) -> Any:
    """The run's status from its ranks': crashed if one crashed, finished when all finished.
    Returns the run's row."""
    states = {s for (s,) in conn.execute(select(run_ranks.c.status).where(run_ranks.c.run_id == run_id))}
    status = "crashed" if "crashed" in states else "running" if "running" in states or not states else "finished"
    current = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar_one_or_none()
    if current is not None and current != status:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status=status, updated_at=now, finished_at=None if status == "running" else now)
        )
    return conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()


def environment_differences(envs: list[dict]) -> list[str]:
    """Top-level environment keys (``packages.torch`` one level down for dicts) whose values are not
    the same on every rank that reported one; host and pid are expected to differ and are left out."""
    if len(envs) < 2:
        return []
    keys: set[str] = set()
    for env in envs:
        for k, v in env.items():
            keys.update(f"{k}.{k2}" for k2 in v) if isinstance(v, dict) else keys.add(k)

    def get(env: dict, key: str) -> Any:
        top, _, sub = key.partition(".")
        v = env.get(top)
        return v.get(sub) if sub and isinstance(v, dict) else v

    ignore = {"host", "pid"}
    return sorted(k for k in keys if k not in ignore and len({json.dumps(get(e, k), sort_keys=True) for e in envs}) > 1)


class RunStore:
    def __init__(self, db: Database):
        self.db = db

    # -- writes ------------------------------------------------------------------------------
    def upsert_run(
        self,
        run_id: str,
        project: str,
        name: str,
        config: dict,
        host: str | None,
        rank: int = 0,
        tags: Iterable[str] = (),
        environment: dict | None = None,
    ) -> dict:
        """Register a run, or a rank of it (idempotent). The first registration sets name and config;
        tags accumulate; each rank keeps its own environment (a registration without one keeps the
        last)."""
        now = time.time()
        ins = self.db.insert
        with self.db.write() as conn:
            ensure_project(conn, project, now)
            stmt = ins(runs).values(
                id=run_id,
                project=project,
                name=name,
                status="running",
                config=wire.json_safe(config),
                host=host,
                created_at=now,
                updated_at=now,
            )
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
            if row["project"] != project:
                raise Rejected("run_project_mismatch", f"run {run_id} belongs to project {row['project']!r}")
            if tags:
                conn.execute(
                    ins(run_tags).on_conflict_do_nothing(), [{"run_id": run_id, "tag": t} for t in sorted(set(tags))]
                )
            env = None if environment is None else wire.json_safe(environment)
            # a rank registering again (a resumed process) is running again
            rank_row = ins(run_ranks).values(
                run_id=run_id, rank=rank, status="running", host=host, started_at=now, environment=env, last_seen=now
            )
            again = {"status": "running", "finished_at": None, "host": host, "last_seen": now, "crash_reason": None}
            if env is not None:
                again["environment"] = env
            conn.execute(rank_row.on_conflict_do_update(index_elements=["run_id", "rank"], set_=again))
            out = dict(settle(conn, run_id, now))
            out["tags"] = self._tags(conn, run_id)
        return out

    def delete_runs(
        self,
        run_id: str | None = None,
        project: str | None = None,
        force: bool = False,
        actor: str = "anonymous",
        remote: str | None = None,
    ) -> list[str]:
        """Delete one run, or every run of a project, completely: its ranks, series, points,
        idempotency keys, alerts and webhook deliveries go with it (foreign keys cascade), in one
        transaction with its audit entry. A run still running is refused (``run_active``) unless
        ``force``: its trainer would go on sending into a run that no longer exists. Returns the
        ids deleted."""
        found = self._to_delete(run_id, project)
        active = [rid for rid, status, _ in found if status == "running"]
        if active and not force:
            raise Rejected(
                "run_active", f"{len(active)} run(s) still running (e.g. {active[0]}); force=true deletes them anyway"
            )
        ids = sorted(rid for rid, _, _ in found)
        # no batch of these runs is ingested meanwhile (striped locks, taken in one order)
        with contextlib.ExitStack() as held:
            for lock in sorted({self.db.run_lock(r) for r in ids}, key=id):
                held.enter_context(lock)
            with self.db.write() as conn:
                conn.execute(runs.delete().where(runs.c.id.in_(ids)))
                if run_id is not None:
                    write_audit(conn, actor, "run.delete", found[0].project, run_id, {"force": force}, remote)
                else:
                    conn.execute(projects.delete().where(projects.c.name == project))
                    write_audit(
                        conn, actor, "project.delete", project, project, {"runs": len(ids), "force": force}, remote
                    )
            for rid in ids:
                self.db.forget(rid)
        return ids

    def _to_delete(self, run_id: str | None, project: str | None) -> list[Any]:
        q = select(runs.c.id, runs.c.status, runs.c.project)
        q = q.where(runs.c.id == run_id) if run_id is not None else q.where(runs.c.project == project)
        with self.db.read() as conn:
            found = conn.execute(q).all()
            known = (
                project is not None
                and conn.execute(select(projects.c.name).where(projects.c.name == project)).first() is not None
            )
        if not found and not known:
            raise NotFound(run_id if run_id is not None else f"project {project}")
        return list(found)

    # -- reads -------------------------------------------------------------------------------
    def run_project(self, run_id: str) -> str | None:
        with self.db.read() as conn:
            return conn.execute(select(runs.c.project).where(runs.c.id == run_id)).scalar()

    def list_runs(
        self,
        project: str | None = None,
        status: str | None = None,
        limit: int = 100,
        *,
        created_after: float | None = None,
        created_before: float | None = None,
        config: dict[str, str] | None = None,
        tags: Iterable[str] = (),
        sort: str = "created_at",
        descending: bool = True,
        after: tuple | None = None,
    ) -> tuple[list[dict], tuple | None]:
        """One page of runs and the key to pass as ``after`` for the next (None on the last page).

        Keyset pagination on (sort column, id): a page costs the same wherever it starts, and runs
        registered meanwhile never shift the pages. ``config`` matches top-level config entries by
        their JSON text (``{"lr": "0.001", "opt": '"adamw"'}``) as the database renders it."""
        col = runs.c[sort]
        q = select(runs)
        for cond, want in ((runs.c.project == project, project), (runs.c.status == status, status)):
            if want:
                q = q.where(cond)
        if created_after is not None:
            q = q.where(runs.c.created_at >= created_after)
        if created_before is not None:
            q = q.where(runs.c.created_at < created_before)
        for key, value in (config or {}).items():
            q = q.where(self._config_entry(key) == value)
        for tag in tags:  # every tag given
            q = q.where(exists().where(run_tags.c.run_id == runs.c.id, run_tags.c.tag == tag))
        if after is not None:
            page_key = tuple_(col, runs.c.id)
            q = q.where(page_key < tuple_(*after) if descending else page_key > tuple_(*after))
        q = q.order_by(*((col.desc(), runs.c.id.desc()) if descending else (col, runs.c.id))).limit(limit + 1)
        with self.db.read() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
            more = len(rows) > limit
            rows = rows[:limit]
            tagged = self._tags_of(conn, [r["id"] for r in rows])
        for r in rows:
            r["tags"] = tagged.get(r["id"], [])
        return rows, ((rows[-1][sort], rows[-1]["id"]) if more else None)

    def _config_entry(self, key: str) -> Any:
        """The JSON text of one top-level config entry (NULL when absent)."""
        if self.db.dialect == "postgresql":
            return cast(runs.c.config.op("->")(key), Text)  # the entry as JSON
        # SQLite >= 3.38: a quoted path, so a key is one key ("a.b" is not a.b, "1a" no array index)
        return runs.c.config.op("->")(f'$."{key}"')

    def get_run(self, run_id: str) -> dict:
        """One run: its row, the last value of every series, alert counts, ranks, tags, environment."""
        with self.db.read() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                raise NotFound(run_id)
            last = conn.execute(latest(series.c.run_id == run_id).order_by(series.c.name)).all()
            counts = conn.execute(
                select(alerts.c.state, func.count()).where(alerts.c.run_id == run_id).group_by(alerts.c.state)
            ).all()
            unacked = conn.execute(
                select(func.count()).where(
                    alerts.c.run_id == run_id, alerts.c.state == "firing", alerts.c.acknowledged_at.is_(None)
                )
            ).scalar()
            ranks = [
                dict(r)
                for r in conn.execute(
                    select(run_ranks).where(run_ranks.c.run_id == run_id).order_by(run_ranks.c.rank)
                ).mappings()
            ]
            tags = self._tags(conn, run_id)
        out = dict(row)
        out["last"] = {n: {"step": s, "value": v} for _, n, s, v in last}
        out["alerts"] = {state: n for state, n in counts}
        out["alerts"]["firing_unacknowledged"] = unacked
        out["ranks"], out["tags"] = ranks, tags
        envs = [r["environment"] for r in ranks if r["environment"] is not None]
        out["environment"] = envs[0] if envs else None
        out["environment_differs"] = environment_differences(envs)
        return out

    @staticmethod
    def _tags(conn: Connection, run_id: str) -> list[str]:
        return list(
            conn.execute(select(run_tags.c.tag).where(run_tags.c.run_id == run_id).order_by(run_tags.c.tag)).scalars()
        )

    @staticmethod
    def _tags_of(conn: Connection, ids: list[str]) -> dict[str, list[str]]:
        tagged: dict[str, list[str]] = collections.defaultdict(list)
        if ids:
            for rid, tag in conn.execute(
                select(run_tags.c.run_id, run_tags.c.tag).where(run_tags.c.run_id.in_(ids)).order_by(run_tags.c.tag)
            ):
                tagged[rid].append(tag)
        return tagged

    # -- ingest ------------------------------------------------------------------------------
    @staticmethod
    def row_for_ingest(conn: Connection, run_id: str) -> Any:
        """(id, project, name) of the run a batch is for, in the batch's transaction."""
        run = conn.execute(select(runs.c.id, runs.c.project, runs.c.name).where(runs.c.id == run_id)).first()
        if run is None:
            raise NotFound(run_id)
        return run

    @staticmethod
    def touch(conn: Connection, run_id: str, now: float) -> None:
        conn.execute(update(runs).where(runs.c.id == run_id).values(updated_at=now))
