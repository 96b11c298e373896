"""Chunked storage, through the real collector on SQLite and PostgreSQL: what a series reads back
after overwrites, several ranks, sparse series, ranges and limits, for both wire versions."""

from __future__ import annotations

import math
import struct
from array import array

import httpx
from test_api import post, register

from optiscope import wire


def columns(seq, steps, series, rank=0, run="run1") -> bytes:
    """A version 2 body: series is {name: [value or None per record]} (None: absent there)."""
    cols = []
    for name, vals in series.items():
        present = [i for i, v in enumerate(vals) if v is not None]
        mask = None
        if len(present) != len(vals):
            m = bytearray((len(vals) + 7) // 8)
            for i in present:
                m[i >> 3] |= 1 << (i & 7)
            mask = bytes(m)
        cols.append(wire.Column(name, array("d", [vals[i] for i in present]), mask))
    return wire.encode_columns(wire.Columns(run, rank, seq, array("q", steps), array("d", [1.0] * len(steps)), cols))


def test_newest_write_wins_at_read_time(collector):
    c = collector
    assert register(c).status_code == 200
    every = list(range(10))
    r = post(
        c,
        columns(0, every, {"x": [float(s) for s in every], "sparse": [1.0 if s % 3 == 0 else None for s in every]}),
        headers={"Content-Type": wire.CONTENT_TYPE},
    )
    assert r.status_code == 200 and r.json()["points"] == 14
    # a later batch rewrites steps 4..6, and within itself logs step 5 twice: the later record wins
    assert post(c, columns(1, [4, 5, 5, 6], {"x": [40.0, 50.0, 55.0, 60.0]})).status_code == 200
    data = c.api("/runs/run1/series/x")
    assert data["steps"] == every
    assert data["values"] == [0.0, 1.0, 2.0, 3.0, 40.0, 55.0, 60.0, 7.0, 8.0, 9.0]
    assert c.api("/runs/run1/series/sparse")["steps"] == [0, 3, 6, 9]
    # the rewrite did not move the newest point: step 9 is still the last one
    assert c.api("/runs/run1")["last"]["x"] == {"step": 9, "value": 9.0}
    # an overwrite of the newest step is the newest value
    assert post(c, columns(2, [9], {"x": [-math.inf]})).status_code == 200
    assert c.api("/runs/run1")["last"]["x"] == {"step": 9, "value": "-Infinity"}
    listed = {s["name"]: s for s in c.api("/runs/run1/series")["series"]}
    assert listed["x"]["last_step"] == 9 and listed["x"]["last_value"] == "-Infinity"
    assert listed["sparse"]["last_step"] == 9 and listed["sparse"]["last_value"] == 1.0
    # ranges cut across chunks; a limit keeps the lowest steps
    assert c.api("/runs/run1/series/x?start=5&end=8")["values"] == [55.0, 60.0, 7.0, 8.0]
    limited = c.api("/runs/run1/series/x?start=3&limit=2")
    assert limited["steps"] == [3, 4] and limited["values"] == [3.0, 40.0] and limited["truncated"] is True
    assert c.api("/runs/run1/series/x?start=3&limit=7")["truncated"] is False


def test_ranks_out_of_order_steps_and_non_finite_values(collector):
    c = collector
    assert register(c).status_code == 200
    nan_bits = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0001))[0]  # a NaN with a payload
    assert post(c, columns(0, [7, 3, 5], {"g": [math.nan, math.inf, 2.0]}, rank=1)).status_code == 200
    assert post(c, columns(0, [3, 5], {"g": [-math.inf, nan_bits]}, rank=0)).status_code == 200
    data = c.api("/runs/run1/series/g")
    assert list(zip(data["steps"], data["ranks"], data["values"])) == [
        (3, 0, "-Infinity"),
        (3, 1, "Infinity"),
        (5, 0, "NaN"),
        (5, 1, 2.0),
        (7, 1, "NaN"),
    ]
    assert c.api("/runs/run1/series/g?rank=0")["steps"] == [3, 5]
    # steps out of order in one batch: the newest point is the highest step, not the last record
    assert c.api("/runs/run1")["last"]["g"] == {"step": 7, "value": "NaN"}
    # the same (run, rank, seq) again is acknowledged and not stored twice
    again = post(c, columns(0, [3, 5], {"g": [1.0, 1.0]}, rank=0))
    assert again.status_code == 200 and again.json() == {"duplicate": True, "points": 0, "alerts": []}
    assert c.api("/runs/run1/series/g?rank=0")["values"] == ["-Infinity", "NaN"]


def test_both_wire_versions_feed_the_same_series(collector):
    c = collector
    assert register(c).status_code == 200
    v1 = wire.encode_batch(wire.Batch("run1", 0, 0, [(0, 1.0, {"loss": 3.0}), (1, 1.0, {"loss": math.nan})]), 1)
    assert v1.startswith(b"{")
    assert post(c, v1).status_code == 200
    assert post(c, columns(1, [2, 3], {"loss": [math.inf, 1.5]})).status_code == 200
    data = c.api("/runs/run1/series/loss")
    assert data["steps"] == [0, 1, 2, 3] and data["values"] == [3.0, "NaN", "Infinity", 1.5]
    alerts = c.api("/runs/run1/alerts")["alerts"]  # the detector ran on both: one incident, still firing
    assert [(a["series"], a["step"], a["state"]) for a in alerts] == [("loss", 1, "resolved")]
    assert post(c, columns(2, [4], {"loss": [math.nan]})).json()["alerts"]
    assert [(a["step"], a["state"]) for a in c.api("/runs/run1/alerts")["alerts"]] == [(4, "firing"), (1, "resolved")]


def test_malformed_binary_batches_are_refused_and_lose_nothing(sqlite_collector):
    c = sqlite_collector
    assert register(c).status_code == 200
    good = columns(0, [0, 1], {"a": [1.0, 2.0]})
    assert post(c, good).status_code == 200

    def reason(body, status):
        r = post(c, body, headers={"Content-Type": wire.CONTENT_TYPE})
        assert r.status_code == status, r.text
        return r.json()["reason"]

    assert reason(good[:-3], 400) == "truncated"
    assert reason(good + b"\0", 400) == "trailing_bytes"
    assert reason(wire.MAGIC + b"\x09" + good[5:], 422) == "unsupported_version"
    assert reason(columns(1, [0, 1], {"bad name": [1.0, 2.0]}), 422) == "bad_name"
    assert reason(columns(1, [0, 1], {"a": [1.0, 2.0]}, run="other"), 422) == "run_mismatch"
    assert c.api("/runs/run1/series/a")["values"] == [1.0, 2.0]
    metrics = httpx.get(f"{c.url}/metrics").text
    for r in ("truncated", "trailing_bytes", "unsupported_version", "bad_name"):
        assert f'optiscope_ingest_rejections_total{{reason="{r}"}}' in metrics


def test_points_of_a_database_from_before_chunks_are_kept(db_url, tmp_path):
    """Earlier collectors stored one row per point in `points` (NaN as NULL); starting this one on
    such a database moves them into chunks and serves them as before."""
    from sqlalchemy import create_engine, insert, text

    from optiscope_server.storage.tables import metadata, runs, series

    from conftest import Collector

    engine = create_engine(db_url)
    metadata.create_all(engine, tables=[runs, series])
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE points (series_id INTEGER NOT NULL REFERENCES series (id), rank INTEGER NOT NULL, "
                "step BIGINT NOT NULL, value DOUBLE PRECISION, PRIMARY KEY (series_id, rank, step))"
            )
        )
        conn.execute(
            insert(runs).values(
                id="old", project="p", name="n", status="finished", config={}, created_at=1.0, updated_at=1.0
            )
        )
        conn.execute(insert(series).values(run_id="old", name="loss"))
        sid = conn.execute(text("SELECT id FROM series")).scalar()
        rows = [(0, 0, 1.0), (0, 1, None), (0, 2, float("inf")), (0, 4, 4.0), (1, 0, -1.0)]
        conn.execute(
            text("INSERT INTO points VALUES (:sid, :rank, :step, :value)"),
            [{"sid": sid, "rank": r, "step": s, "value": v} for r, s, v in rows],
        )
    engine.dispose()
    c = Collector(db_url, cwd=tmp_path).start()
    try:
        data = c.api("/runs/old/series/loss")
        assert list(zip(data["steps"], data["ranks"], data["values"])) == [
            (0, 0, 1.0),
            (0, 1, -1.0),
            (1, 0, "NaN"),
            (2, 0, "Infinity"),
            (4, 0, 4.0),
        ]
        assert c.api("/runs/old")["last"]["loss"] == {"step": 4, "value": 4.0}
    finally:
        c.stop()
    c = Collector(db_url, cwd=tmp_path).start()  # once: a second start finds nothing to move
    try:
        assert len(c.api("/runs/old/series/loss")["steps"]) == 5
    finally:
        c.stop()


def test_sqlite_log_is_checkpointed_beside_the_writer(tmp_path):
    """Commits never checkpoint (that fsync would land on one unlucky batch); the checkpointer
    thread does, after which the log is reused from its start. Closing leaves an empty log."""
    from optiscope_server.collector import Collector
    from optiscope_server.settings import Settings

    db = tmp_path / "o.db"
    wal = tmp_path / "o.db-wal"
    store = Collector(Settings(db_url=f"sqlite:///{db}"))
    store.db.checkpointer.stop()  # driven by hand below, not by the clock
    store.runs.upsert_run("run1", "p", "n", {}, None)

    def ingest(seq):
        body = columns(seq, list(range(seq * 100, seq * 100 + 100)), {f"s{i}": [float(seq)] * 100 for i in range(300)})
        store.ingestor.ingest(wire.decode_columns(body))

    for seq in range(20):
        ingest(seq)
    grown = wal.stat().st_size
    assert grown > 1500 * 4096  # well past SQLite's own threshold (1,000 pages): no commit checkpointed
    store.db.checkpointer.checkpoint()
    for seq in range(20, 25):
        ingest(seq)
    assert wal.stat().st_size == grown  # checkpointed: the next commits wrote over the log's start
    store.close()
    assert not wal.exists() or wal.stat().st_size == 0
    again = Collector(Settings(db_url=f"sqlite:///{db}"))
    try:
        steps, _, values, _, _ = again.series.get_series("run1", "s299")
        assert steps == list(range(2500)) and values[-1] == 24.0
    finally:
        again.close()
