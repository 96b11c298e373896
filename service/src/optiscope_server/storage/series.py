"""Series and their points: the catalog of a run's series, chunk writes and reads, idempotency keys.

A batch's points are stored as chunks (one row per series and batch, see ``tables.chunks``) and read
back merged by step. The catalog of recently seen runs (name -> series id) is kept in memory, so a
batch of known series costs no catalog query; ids never change once committed.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from .chunks import Chunk, merge
from .database import Database
from .errors import NotFound, Rejected
from .latest import latest
from .runs import require_run
from .tables import batches, chunks, series

_CHUNK_COLUMNS = ("series_id", "rank", "step_min", "step_max", "last_value", "steps", "vals")
#: Runs whose catalog is kept in memory; the least recently used leaves.
CATALOG_CACHE_RUNS = 1024


class SeriesStore:
    def __init__(self, db: Database, max_series_per_run: int = 10_000):
        self.db, self.max_series_per_run = db, max_series_per_run
        self._catalog: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        db.on_forget(self.forget)

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._catalog.pop(run_id, None)

    # -- ingest, in the batch's transaction -------------------------------------------------------
    def claim_batch(self, conn: Connection, run_id: str, rank: int, seq: int, now: float) -> bool:
        """Record the batch's idempotency key (run, rank, seq); False when it was stored before."""
        key = self.db.insert(batches).values(run_id=run_id, rank=rank, seq=seq, received_at=now)
        # RETURNING rather than rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
        return conn.execute(key.on_conflict_do_nothing().returning(batches.c.seq)).first() is not None

    def write(self, conn: Connection, run_id: str, rank: int, prepared: Sequence[Chunk]) -> dict[str, int]:
        """Store a batch's chunks (creating its new series); returns the run's catalog, to
        ``remember`` once the transaction has committed."""
        ids = self._series_ids(conn, run_id, [c.name for c in prepared])
        if prepared:
            self._write_chunks(
                conn,
                [
                    (
                        ids[c.name],
                        rank,
                        c.step_min,
                        c.step_max,
                        None if math.isnan(c.last_value) else c.last_value,
                        c.steps,
                        c.vals,
                    )
                    for c in prepared
                ],
            )
        return ids

    def remember(self, run_id: str, ids: dict[str, int]) -> None:
        """Keep a committed catalog (bounded: the least recently used run leaves)."""
        with self._lock:
            self._catalog[run_id] = ids
            self._catalog.move_to_end(run_id)
            while len(self._catalog) > CATALOG_CACHE_RUNS:
                self._catalog.popitem(last=False)

    def _write_chunks(self, conn: Connection, rows: list[tuple]) -> None:
        """Append chunk rows (columns in _CHUNK_COLUMNS order; a NaN last_value already NULL, as the
        Value type stores it) in the transaction of ``conn``. The one place that speaks to the driver
        directly: a batch is hundreds of rows, and SQLAlchemy's per-row parameter processing, or
        psycopg's per-row pipeline, cost more than the database's own work (PostgreSQL: 15-20 ms for
        300 rows as INSERTs, 3 ms as one binary COPY)."""
        if self.db.dialect == "postgresql":
            raw: Any = conn.connection.dbapi_connection  # psycopg's own connection: COPY
            with (
                raw.cursor() as cur,
                cur.copy(f"COPY chunks ({', '.join(_CHUNK_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(["int4", "int4", "int8", "int8", "float8", "bytea", "bytea"])
                for row in rows:
                    copy.write_row(row)
        else:
            conn.exec_driver_sql(f"INSERT INTO chunks ({', '.join(_CHUNK_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _series_ids(self, conn: Connection, run_id: str, names: list[str]) -> dict[str, int]:
        with self._lock:
            have = self._catalog.get(run_id)
        if have is not None and all(n in have for n in names):
            return have
        have = dict(conn.execute(select(series.c.name, series.c.id).where(series.c.run_id == run_id)).all())
        missing = set(names) - have.keys()
        if missing:
            if len(have) + len(missing) > self.max_series_per_run:
                raise Rejected(
                    "too_many_series",
                    f"run {run_id} would have {len(have) + len(missing)} series; "
                    f"the limit is {self.max_series_per_run}",
                )
            conn.execute(
                self.db.insert(series).on_conflict_do_nothing(),
                [{"run_id": run_id, "name": n} for n in sorted(missing)],
            )
            have = dict(conn.execute(select(series.c.name, series.c.id).where(series.c.run_id == run_id)).all())
        return have

    # -- reads -------------------------------------------------------------------------------
    def list_series(self, run_id: str) -> list[dict]:
        """The run's series, each with its last step and value."""
        with self.db.read() as conn:
            require_run(conn, run_id)
            rows = conn.execute(latest(series.c.run_id == run_id, outer=True).order_by(series.c.name)).all()
        return [{"name": n, "last_step": s, "last_value": v} for _, n, s, v in rows]

    def get_series(
        self,
        run_id: str,
        name: str,
        rank: int | None = None,
        start: int | None = None,
        end: int | None = None,
        limit: int = 100_000,
        max_points: int | None = None,
    ) -> tuple[list, list, list, bool, int | None]:
        """(steps, ranks, values, truncated, bucket width) ordered by step then rank, downsampled to
        about ``max_points`` when given (see ``chunks.merge``), at most ``limit`` points."""
        with self.db.read() as conn:
            sid = conn.execute(select(series.c.id).where(series.c.run_id == run_id, series.c.name == name)).scalar()
            if sid is None:
                require_run(conn, run_id)  # 404 for the run rather than the series when both are missing
                raise NotFound(f"{run_id}/{name}")
            rows = self.read_chunks(conn, sid, rank, start, end)
        return merge(rows, start, end, limit, max_points)

    def series_ids(self, conn: Connection, run_id: str, names: Sequence[str]) -> list[tuple[str, int]]:
        """(name, id) of those of ``names`` the run has."""
        return [
            (n, i)
            for n, i in conn.execute(
                select(series.c.name, series.c.id).where(series.c.run_id == run_id, series.c.name.in_(list(names)))
            ).all()
        ]

    def first_step(self, conn: Connection, sid: int, rank: int) -> int | None:
        """The first step stored for one rank of a series (None: none)."""
        return conn.execute(
            select(chunks.c.step_min)
            .where(chunks.c.series_id == sid, chunks.c.rank == rank)
            .order_by(chunks.c.step_max)
            .limit(1)
        ).scalar()

    def read_chunks(
        self, conn: Connection, sid: int, rank: int | None, start: int | None, end: int | None
    ) -> list[Any]:
        """Chunk rows (rank, step_min, step_max, steps, vals) of one series in storage order. On
        PostgreSQL through a binary cursor: in text, the server sends every bytea hex-encoded
        and the client decodes it, most of the time of a million-point read (about 40 of 70 ms)."""
        q = select(chunks.c.rank, chunks.c.step_min, chunks.c.step_max, chunks.c.steps, chunks.c.vals).where(
            chunks.c.series_id == sid
        )
        if rank is not None:
            q = q.where(chunks.c.rank == rank)
        if start is not None:
            q = q.where(chunks.c.step_max >= start)
        if end is not None:
            q = q.where(chunks.c.step_min <= end)
        q = q.order_by(chunks.c.id)
        if self.db.dialect != "postgresql":
            return list(conn.execute(q).all())
        sql = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        raw: Any = conn.connection.dbapi_connection  # psycopg's own connection: a binary cursor
        with raw.cursor(binary=True) as cur:
            cur.execute(str(sql), sql.params)
            return cur.fetchall()
