"""Run history: every read and write of the collector goes through this module."""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from sqlalchemy import Text, case, cast, exists, func, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from optiscope import wire
from optiscope.detect import Detector, default_detectors

from .access import ensure_project, write_audit
from .alertstore import AlertStore
from .chunks import BatchColumns, merge
from .detection import Detection
from .db import Checkpointer, alerts, batches, chunks, make_engine, projects, run_ranks, run_tags, runs, series
from .errors import NotFound, Rejected
from .lifecycle import Lifecycle, environment_differences

log = logging.getLogger("optiscope.server")

_CHUNK_COLUMNS = ("series_id", "rank", "step_min", "step_max", "last_value", "steps", "vals")


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


class Store(Lifecycle, AlertStore, Detection):
    """Runs, series and points; alerts (AlertStore) and rank liveness (Lifecycle) are mixed in."""

    def __init__(self, url: str, max_series_per_run: int = 10_000,
                 detectors: Callable[[dict], list[Detector]] | None = None):
        self.url = url
        self.engine: Engine = make_engine(url)
        self.max_series_per_run = max_series_per_run
        self._new_detectors = detectors or default_detectors
        self._insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)
        # Detector state per run (detection.Detection), caught up from the store before each batch.
        self._detectors: dict = {}
        # Batches of one run are ingested one at a time (detector order); striped locks keep that
        # bounded in memory however many runs a collector sees.
        self._run_locks = [threading.Lock() for _ in range(64)]
        # SQLite has one writer at a time; queueing writers here instead of in SQLite's busy handler
        # (which sleeps up to 100 ms between tries) keeps the batch latency even.
        self._writer = threading.Lock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()
        self._checkpointer = Checkpointer(self.engine, self._writer) if self.engine.dialect.name == "sqlite" else None
        # name -> id of the series of recently seen runs (ids never change once committed), so a batch
        # of known series costs no catalog query. Bounded: the least recently used run leaves.
        self._series_cache: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        # (run, rank) -> monotonic time its last_seen was last written by this replica: a batch
        # rewrites it only every seen_interval seconds (kept below a quarter of the heartbeat
        # timeout, so no busy rank looks silent), sparing a write per batch. Bounded like the cache.
        self.seen_interval = 5.0
        self._seen_at: collections.OrderedDict[tuple[str, int], float] = collections.OrderedDict()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()

    # -- runs --------------------------------------------------------------------------------
    def upsert_run(self, run_id: str, project: str, name: str, config: dict, host: str | None,
                   rank: int = 0, tags: Iterable[str] = (), environment: dict | None = None) -> dict:
        """Register a run, or a rank of it (idempotent). The first registration sets name and config;
        tags accumulate; each rank keeps its own environment (a registration without one keeps the
        last)."""
        now = time.time()
        with self._writer, self.engine.begin() as conn:
            ensure_project(conn, project, now)
            stmt = self._insert(runs).values(id=run_id, project=project, name=name, status="running",
                                             config=_finite_json(config), host=host, created_at=now,
                                             updated_at=now)
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
            if row["project"] != project:
                raise Rejected("run_project_mismatch", f"run {run_id} belongs to project {row['project']!r}")
            if tags:
                conn.execute(self._insert(run_tags).on_conflict_do_nothing(),
                             [{"run_id": run_id, "tag": t} for t in sorted(set(tags))])
            env = None if environment is None else _finite_json(environment)
            # a rank registering again (a resumed process) is running again
            ins = self._insert(run_ranks).values(run_id=run_id, rank=rank, status="running", host=host, started_at=now,
                                                 environment=env, last_seen=now)
            again = {"status": "running", "finished_at": None, "host": host, "last_seen": now, "crash_reason": None}
            if env is not None:
                again["environment"] = env
            conn.execute(ins.on_conflict_do_update(index_elements=["run_id", "rank"], set_=again))
            row = dict(self._settle(conn, run_id, now))
            row["tags"] = list(conn.execute(select(run_tags.c.tag).where(run_tags.c.run_id == run_id)
                                            .order_by(run_tags.c.tag)).scalars())
        return row

    def run_project(self, run_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(runs.c.project).where(runs.c.id == run_id)).scalar()

    def delete_runs(self, run_id: str | None = None, project: str | None = None, force: bool = False,
                    actor: str = "anonymous", remote: str | None = None) -> list[str]:
        """Delete one run, or every run of a project, completely: its ranks, series, points,
        idempotency keys, alerts and webhook deliveries go with it (foreign keys cascade), in one
        transaction. A run still running is refused (``run_active``) unless ``force``: its trainer
        would go on sending into a run that no longer exists. Returns the ids deleted."""
        q = select(runs.c.id, runs.c.status, runs.c.project)
        q = q.where(runs.c.id == run_id) if run_id is not None else q.where(runs.c.project == project)
        with self.engine.connect() as conn:
            found = conn.execute(q).all()
            known = project is not None and conn.execute(
                select(projects.c.name).where(projects.c.name == project)).first() is not None
        if not found and not known:
            raise NotFound(run_id if run_id is not None else f"project {project}")
        active = [rid for rid, status, _ in found if status == "running"]
        if active and not force:
            raise Rejected("run_active", f"{len(active)} run(s) still running (e.g. {active[0]}); force=true deletes "
                                         "them anyway")
        ids = sorted(rid for rid, _, _ in found)
        # no batch of these runs is ingested meanwhile (striped locks, taken in one order)
        with contextlib.ExitStack() as held:
            for lock in sorted({self._run_lock(r) for r in ids}, key=id):
                held.enter_context(lock)
            with self._writer, self.engine.begin() as conn:
                conn.execute(runs.delete().where(runs.c.id.in_(ids)))
                if run_id is not None:
                    write_audit(conn, actor, "run.delete", found[0].project, run_id,
                                {"force": force}, remote)
                else:
                    conn.execute(projects.delete().where(projects.c.name == project))
                    write_audit(conn, actor, "project.delete", project, project, {"runs": len(ids), "force": force},
                                remote)
            with self._cache_lock:
                for rid in ids:
                    self._series_cache.pop(rid, None)
                    self._detectors.pop(rid, None)
        return ids

    def list_runs(self, project: str | None = None, status: str | None = None, limit: int = 100, *,
                  created_after: float | None = None, created_before: float | None = None,
                  config: dict[str, str] | None = None, tags: Iterable[str] = (), sort: str = "created_at",
                  descending: bool = True, after: tuple | None = None) -> tuple[list[dict], tuple | None]:
        """One page of runs and the key to pass as ``after`` for the next (None on the last page).

        Keyset pagination on (sort column, id): a page costs the same wherever it starts, and runs
        registered meanwhile never shift the pages. ``config`` matches top-level config entries by
        their JSON text (``{"lr": "0.001", "opt": '"adamw"'}``) as the database renders it."""
        col = runs.c[sort]
        q = select(runs)
        if project:
            q = q.where(runs.c.project == project)
        if status:
            q = q.where(runs.c.status == status)
        if created_after is not None:
            q = q.where(runs.c.created_at >= created_after)
        if created_before is not None:
            q = q.where(runs.c.created_at < created_before)
        for key, value in (config or {}).items():
            q = q.where(self._config_entry(key) == value)
        for tag in tags:  # every tag given
            q = q.where(exists().where(run_tags.c.run_id == runs.c.id, run_tags.c.tag == tag))
        if after is not None:
            key = tuple_(col, runs.c.id)
            q = q.where(key < tuple_(*after) if descending else key > tuple_(*after))
        q = q.order_by(*((col.desc(), runs.c.id.desc()) if descending else (col, runs.c.id))).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
            more = len(rows) > limit
            rows = rows[:limit]
            tagged = collections.defaultdict(list)
            if rows:
                for rid, tag in conn.execute(select(run_tags.c.run_id, run_tags.c.tag).where(
                        run_tags.c.run_id.in_([r["id"] for r in rows])).order_by(run_tags.c.tag)):
                    tagged[rid].append(tag)
        for r in rows:
            r["tags"] = tagged.get(r["id"], [])
        return rows, ((rows[-1][sort], rows[-1]["id"]) if more else None)

    def _config_entry(self, key: str):
        """The JSON text of one top-level config entry (NULL when absent)."""
        if self.engine.dialect.name == "postgresql":
            return cast(runs.c.config.op("->")(key), Text)  # the entry as JSON
        # SQLite >= 3.38: a quoted path, so a key is one key ("a.b" is not a.b, "1a" no array index)
        return runs.c.config.op("->")(f'$."{key}"')

    def get_run(self, run_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                raise NotFound(run_id)
            last = conn.execute(_latest(series.c.run_id == run_id).order_by(series.c.name)).all()
            counts = conn.execute(select(alerts.c.state, func.count()).where(alerts.c.run_id == run_id)
                                  .group_by(alerts.c.state)).all()
            unacked = conn.execute(select(func.count()).where(alerts.c.run_id == run_id, alerts.c.state == "firing",
                                                              alerts.c.acknowledged_at.is_(None))).scalar()
            ranks = [dict(r) for r in conn.execute(select(run_ranks).where(run_ranks.c.run_id == run_id)
                                                   .order_by(run_ranks.c.rank)).mappings()]
            tags = list(conn.execute(select(run_tags.c.tag).where(run_tags.c.run_id == run_id)
                                     .order_by(run_tags.c.tag)).scalars())
        out = dict(row)
        out["last"] = {n: {"step": s, "value": v} for _, n, s, v in last}
        out["alerts"] = {state: n for state, n in counts}
        out["alerts"]["firing_unacknowledged"] = unacked
        out["ranks"], out["tags"] = ranks, tags
        envs = [r["environment"] for r in ranks if r["environment"] is not None]
        out["environment"] = envs[0] if envs else None
        out["environment_differs"] = environment_differences(envs)
        return out

    # -- series ------------------------------------------------------------------------------
    def list_series(self, run_id: str) -> list[dict]:
        self.get_run_row(run_id)
        with self.engine.connect() as conn:
            rows = conn.execute(_latest(series.c.run_id == run_id, outer=True).order_by(series.c.name)).all()
        return [{"name": n, "last_step": s, "last_value": v} for _, n, s, v in rows]

    def get_run_row(self, run_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise NotFound(run_id)
        return dict(row)

    def get_series(self, run_id: str, name: str, rank: int | None = None, start: int | None = None,
                   end: int | None = None, limit: int = 100_000, max_points: int | None = None):
        """(steps, ranks, values, truncated, bucket width) ordered by step then rank, downsampled to
        about ``max_points`` when given (see ``chunks.merge``), at most ``limit`` points."""
        with self.engine.connect() as conn:
            sid = conn.execute(select(series.c.id).where(series.c.run_id == run_id, series.c.name == name)).scalar()
            if sid is None:
                self.get_run_row(run_id)  # 404 for the run rather than the series when both are missing
                raise NotFound(f"{run_id}/{name}")
            rows = self._read_chunks(conn, sid, rank, start, end)
        return merge(rows, start, end, limit, max_points)

    def _read_chunks(self, conn: Connection, sid: int, rank: int | None, start: int | None,
                     end: int | None) -> list[tuple]:
        """Chunk rows (rank, step_min, step_max, steps, vals) of one series in storage order. On
        PostgreSQL through a binary cursor: in text, the server sends every bytea hex-encoded
        and the client decodes it, most of the time of a million-point read (about 40 of 70 ms)."""
        q = select(chunks.c.rank, chunks.c.step_min, chunks.c.step_max, chunks.c.steps, chunks.c.vals) \
            .where(chunks.c.series_id == sid)
        if rank is not None:
            q = q.where(chunks.c.rank == rank)
        if start is not None:
            q = q.where(chunks.c.step_max >= start)
        if end is not None:
            q = q.where(chunks.c.step_min <= end)
        q = q.order_by(chunks.c.id)
        if self.engine.dialect.name != "postgresql":
            return conn.execute(q).all()
        sql = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        with conn.connection.dbapi_connection.cursor(binary=True) as cur:
            cur.execute(str(sql), sql.params)
            return cur.fetchall()

    # -- ingest ------------------------------------------------------------------------------
    def _run_lock(self, run_id: str) -> threading.Lock:
        return self._run_locks[hash(run_id) % len(self._run_locks)]

    def ingest(self, batch: wire.Columns, run_url: str = "") -> IngestResult:
        """Store one batch atomically: its chunks, new series, detector alerts and their outbox rows."""
        cols = BatchColumns(batch)
        prepared = cols.chunks()  # the numpy work, before taking the writer's turn
        with self._run_lock(batch.run):
            try:
                with self._writer, self.engine.begin() as conn:
                    result, ids, seen = self._ingest(conn, batch, cols, prepared, run_url)
            except Exception:
                self._detectors.pop(batch.run, None)  # state may have moved past a rolled-back batch
                raise
        if ids is not None:  # committed: the ids are real now, and last_seen written if seen
            with self._cache_lock:
                if seen is not None:
                    self._seen_at[seen] = time.monotonic()
                    self._seen_at.move_to_end(seen)
                    while len(self._seen_at) > 4096:
                        self._seen_at.popitem(last=False)
                self._series_cache[batch.run] = ids
                self._series_cache.move_to_end(batch.run)
                while len(self._series_cache) > 1024:
                    self._series_cache.popitem(last=False)
        return result

    def _ingest(self, conn: Connection, batch: wire.Columns, cols: BatchColumns, prepared,
                run_url: str) -> tuple[IngestResult, dict[str, int] | None, tuple[str, int] | None]:
        run = conn.execute(select(runs.c.id, runs.c.project, runs.c.name).where(runs.c.id == batch.run)).first()
        if run is None:
            raise NotFound(batch.run)
        now = time.time()
        key = self._insert(batches).values(run_id=batch.run, rank=batch.rank, seq=batch.seq, received_at=now)
        # RETURNING rather than rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
        if conn.execute(key.on_conflict_do_nothing().returning(batches.c.seq)).first() is None:
            return IngestResult(duplicate=True), None, None
        # run_ranks before runs, the order mark_silent, heartbeat and finish_run lock them in: the
        # opposite order could deadlock with another replica marking this rank crashed.
        seen = (batch.run, batch.rank)
        if time.monotonic() - self._seen_at.get(seen, -math.inf) >= self.seen_interval:
            self._seen(conn, batch.run, batch.rank, now)
        else:
            seen = None
        ids = self._series_ids(conn, batch.run, [c.name for c in prepared])
        if prepared:
            self._write_chunks(conn, [(ids[c.name], batch.rank, c.step_min, c.step_max,
                                       None if math.isnan(c.last_value) else c.last_value, c.steps, c.vals)
                                      for c in prepared])
        conn.execute(update(runs).where(runs.c.id == batch.run).values(updated_at=now))
        result = IngestResult(duplicate=False, points=sum(c.n for c in prepared))
        steps = cols.steps
        if len(steps):
            for det in self._detectors_for(conn, batch.run, batch.rank, int(steps.min()), batch.seq):
                for ev in det.update_columns(steps, cols, batch.rank):
                    result.alerts.append(self._record_alert(conn, run, ev, run_url, now))
                    if ev.state == "firing":
                        result.fired.append(ev.rule)
            self._fed(batch.run, batch.rank, int(steps.max()), batch.seq)
        return result, ids, seen

    def _write_chunks(self, conn: Connection, rows: list[tuple]) -> None:
        """Append chunk rows (columns in _CHUNK_COLUMNS order; a NaN last_value already NULL, as the
        Value type stores it) in the transaction of ``conn``. The one place that speaks to the driver
        directly: a batch is hundreds of rows, and SQLAlchemy's per-row parameter processing, or
        psycopg's per-row pipeline, cost more than the database's own work (PostgreSQL: 15-20 ms for
        300 rows as INSERTs, 3 ms as one binary COPY)."""
        if self.engine.dialect.name == "postgresql":
            with conn.connection.dbapi_connection.cursor() as cur, \
                    cur.copy(f"COPY chunks ({', '.join(_CHUNK_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "int4", "int8", "int8", "float8", "bytea", "bytea"])
                for row in rows:
                    copy.write_row(row)
        else:
            conn.exec_driver_sql(f"INSERT INTO chunks ({', '.join(_CHUNK_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _series_ids(self, conn: Connection, run_id: str, names: list[str]) -> dict[str, int]:
        with self._cache_lock:
            have = self._series_cache.get(run_id)
        if have is not None and all(n in have for n in names):
            return have
        have = dict(conn.execute(select(series.c.name, series.c.id).where(series.c.run_id == run_id)).all())
        missing = set(names) - have.keys()
        if missing:
            if len(have) + len(missing) > self.max_series_per_run:
                raise Rejected("too_many_series", f"run {run_id} would have {len(have) + len(missing)} series; "
                                                  f"the limit is {self.max_series_per_run}")
            conn.execute(self._insert(series).on_conflict_do_nothing(),
                         [{"run_id": run_id, "name": n} for n in sorted(missing)])
            have = dict(conn.execute(select(series.c.name, series.c.id).where(series.c.run_id == run_id)).all())
        return have

    # -- projects ----------------------------------------------------------------------------
    def list_projects(self, only: str | None = None) -> list[dict]:
        """Projects with their number of runs, of running runs, and the last activity of any run."""
        per = (select(runs.c.project, func.count().label("runs"),
                      func.sum(case((runs.c.status == "running", 1), else_=0)).label("running"),
                      func.max(runs.c.updated_at).label("last_activity"))
               .group_by(runs.c.project).subquery())
        q = (select(projects.c.name, projects.c.created_at, per.c.runs, per.c.running, per.c.last_activity)
             .select_from(projects.outerjoin(per, per.c.project == projects.c.name)).order_by(projects.c.name))
        if only is not None:
            q = q.where(projects.c.name == only)
        with self.engine.connect() as conn:
            return [{**dict(r), "runs": r.runs or 0, "running": r.running or 0} for r in conn.execute(q).mappings()]

    # -- metrics -----------------------------------------------------------------------------
    def active_runs_latest(self, since: float, max_runs: int, names: Iterable[str],
                           per_rank: Iterable[str] = ()) -> list[dict]:
        """Runs still running or updated since ``since`` (newest first, at most ``max_runs``),
        with the last value of each of ``names``, the number of firing alerts, and for each of
        ``per_rank`` the last value of each rank (``ranks``: {name: {rank: value}}, see
        ``_latest_per_rank``)."""
        per_rank = list(per_rank)
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs.c.id, runs.c.project, runs.c.name, runs.c.updated_at)
                                .where(or_(runs.c.status == "running", runs.c.updated_at >= since))
                                .order_by(runs.c.updated_at.desc()).limit(max_runs)).all()
            ids = [r.id for r in rows]
            if not ids:
                return []
            last = conn.execute(_latest(series.c.run_id.in_(ids), series.c.name.in_(list(names)))).all()
            firing = dict(conn.execute(select(alerts.c.run_id, func.count())
                                       .where(alerts.c.run_id.in_(ids), alerts.c.state == "firing")
                                       .group_by(alerts.c.run_id)).all())
            ranked = self._latest_per_rank(conn, ids, per_rank) if per_rank else []
        out = {r.id: {"run_id": r.id, "project": r.project, "name": r.name, "updated_at": r.updated_at,
                      "values": {}, "step": None, "firing": firing.get(r.id, 0), "ranks": {}} for r in rows}
        for run_id, name, step, value in last:
            o = out[run_id]
            o["values"][name] = value
            o["step"] = step if o["step"] is None else max(o["step"], step)
        for run_id, name, rank, value in ranked:
            out[run_id]["ranks"].setdefault(name, {})[rank] = value
        return list(out.values())

    #: ``_latest_per_rank`` reads this many chunks per rank of the run, and never more than the cap.
    RANK_WINDOW, RANK_WINDOW_MAX = 4, 64

    def _latest_per_rank(self, conn: Connection, ids: list[str], names: list[str]) -> list[tuple]:
        """(run_id, name, rank, value): the newest point of each rank in the series ``names`` of the
        runs ``ids``, for the ranks found among the newest RANK_WINDOW x (ranks of the run) chunks of
        the series, at most RANK_WINDOW_MAX. The chunk index is by step, not by rank, so a fixed
        window read through it keeps a scrape's cost bounded however long the run (a rank's newest
        chunk could otherwise lie anywhere); a rank left out is one that has not reported while the
        others filled the window (a rank that stopped early, or one that reports far less often).
        One query per window size: LATERAL on PostgreSQL, a correlated IN on SQLite (which has no
        LATERAL); both read each series' window backwards through ix_chunks_series_step."""
        from sqlalchemy import true

        counts = dict(conn.execute(select(run_ranks.c.run_id, func.count()).where(run_ranks.c.run_id.in_(ids))
                                   .group_by(run_ranks.c.run_id)).all())
        by_window: dict[int, list[str]] = collections.defaultdict(list)
        for rid in ids:
            by_window[min(self.RANK_WINDOW_MAX, self.RANK_WINDOW * max(1, counts.get(rid, 0)))].append(rid)
        newest: dict[tuple, tuple] = {}
        for window, group in by_window.items():
            where = (series.c.run_id.in_(group), series.c.name.in_(names))
            if self.engine.dialect.name == "postgresql":
                top = (select(chunks.c.rank, chunks.c.step_max, chunks.c.id, chunks.c.last_value)
                       .where(chunks.c.series_id == series.c.id)
                       .order_by(chunks.c.step_max.desc(), chunks.c.id.desc()).limit(window).lateral("top"))
                q = select(series.c.run_id, series.c.name, top.c.rank, top.c.step_max, top.c.id, top.c.last_value) \
                    .select_from(series.join(top, true())).where(*where)
            else:
                w = chunks.alias("w")
                top = (select(w.c.id).where(w.c.series_id == series.c.id)
                       .order_by(w.c.step_max.desc(), w.c.id.desc()).limit(window))
                q = select(series.c.run_id, series.c.name, chunks.c.rank, chunks.c.step_max, chunks.c.id,
                           chunks.c.last_value).select_from(series.join(chunks, chunks.c.id.in_(top))).where(*where)
            for run_id, name, rank, step, cid, value in conn.execute(q):
                key = (run_id, name, rank)
                if key not in newest or (step, cid) > newest[key][0]:
                    newest[key] = ((step, cid), value)
        return [(*key, value) for key, (_, value) in newest.items()]


def _latest(*where, outer: bool = False):
    """(run_id, name, step, value) of the newest point of each series matching ``where``: the chunk
    with the highest step_max (the newest of those on a tie) found through the index, per series.
    ``outer`` keeps series without a point (step and value None)."""
    newest = (select(chunks.c.id).where(chunks.c.series_id == series.c.id)
              .order_by(chunks.c.step_max.desc(), chunks.c.id.desc()).limit(1).correlate(series).scalar_subquery())
    return (select(series.c.run_id, series.c.name, chunks.c.step_max, chunks.c.last_value)
            .select_from(series.join(chunks, chunks.c.id == newest, isouter=outer)).where(*where))

