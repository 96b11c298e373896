"""Series queries: downsampling that keeps extremes and non-finite points, comparison of runs, CSV.

The properties are checked on the collector's own merge-and-downsample code with hypothesis; the
HTTP contract against the real collector on SQLite and PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import math

import httpx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from optiscope import wire
from optiscope_server.storage.chunks import merge

SPECIAL = [math.nan, math.inf, -math.inf]


def _rows(points: dict[int, list[tuple[int, float]]], rng) -> list[tuple]:
    """Chunk rows (rank, step_min, step_max, steps, vals) as the store keeps them: each rank's
    points cut into chunks of random length, explicit steps."""
    rows = []
    for rank, pts in points.items():
        i = 0
        while i < len(pts):
            k = int(rng.integers(1, 40))
            part = pts[i : i + k]
            steps = np.array([s for s, _ in part], dtype="<i8")
            vals = np.array([v for _, v in part], dtype="<f8")
            # consecutive steps are stored as their range alone, as the store does
            consecutive = bool(np.all(np.diff(steps) == 1))
            rows.append(
                (rank, int(steps.min()), int(steps.max()), None if consecutive else steps.tobytes(), vals.tobytes())
            )
            i += k
    rng.shuffle(rows)  # chunks arrive in any order (late batches, replays)
    return rows


@st.composite
def series(draw):
    """Up to three ranks of up to 600 points each: random step gaps, values drawn from a heavy
    tail (spikes), NaN and +-Inf at random places, repeated values (ties for the extremes)."""
    out = {}
    for r in range(draw(st.integers(1, 3))):
        n, n_special = draw(st.integers(0, 600)), draw(st.integers(0, 25))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        steps = np.cumsum(rng.integers(1, draw(st.sampled_from([2, 6])), n))  # 2: all consecutive
        vals = rng.standard_t(2, n) * draw(st.sampled_from([1e-6, 1.0, 1e6]))
        if draw(st.booleans()):
            vals = np.round(vals)  # many ties
        if n:
            vals[rng.integers(0, n, min(n, n_special))] = rng.choice(SPECIAL, min(n, n_special))
        out[r] = list(zip(steps.tolist(), vals.tolist()))
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@settings(max_examples=150, deadline=None)
@given(points=series(), max_points=st.integers(40, 400), seed=st.integers(0, 2**32 - 1))
def test_downsampling_keeps_extremes_non_finite_points_and_ends(points, max_points, seed):
    rows = _rows(points, np.random.default_rng(seed))
    full_s, full_r, full_v, _, none = merge(rows, None, None, 10**9)
    assert none is None  # no max_points: never downsampled
    s, r, v, truncated, width = merge(rows, None, None, 10**9, max_points)
    total = len(full_s)
    if total <= max_points:
        assert width is None and (s, r) == (full_s, full_r)
        return
    assert width is not None and not truncated
    got = {(rank, step): val for step, rank, val in zip(s, r, v)}
    every = {(rank, step): val for step, rank, val in zip(full_s, full_r, full_v)}
    # a subset of the real points, in (step, rank) order
    assert all(_same(every[k], val) for k, val in got.items())
    assert list(zip(s, r)) == sorted(zip(s, r))
    non_finite = [k for k, val in every.items() if not math.isfinite(val)]
    assert all(k in got for k in non_finite)  # every NaN and Inf survives
    assert len(got) <= max(max_points, len(non_finite) + 4 * len(points))
    lo = min(full_s)
    for rank in {k[0] for k in every}:
        mine = sorted((step, val) for (rk, step), val in every.items() if rk == rank)
        assert (rank, mine[0][0]) in got and (rank, mine[-1][0]) in got  # first and last point
        buckets: dict[int, list] = {}
        for step, val in mine:
            buckets.setdefault((step - lo) // width, []).append(val)
        for b, vals in buckets.items():
            finite = [x for x in vals if math.isfinite(x)]
            if not finite:
                continue
            kept = [got[(rank, step)] for step, _ in mine if (step - lo) // width == b and (rank, step) in got]
            assert min(finite) in kept and max(finite) in kept  # each bucket's extremes


def test_a_rewritten_step_is_read_once_with_its_newest_value():
    """Chunks out of step order and a step written twice: the newest write wins, downsampled or not."""
    old = (0, 0, 9, None, np.arange(10, dtype="<f8").tobytes())
    new = (0, 5, 5, np.array([5], dtype="<i8").tobytes(), np.array([99.0]).tobytes())
    s, r, v, _, _ = merge([new, old, new], None, None, 100)
    assert s == list(range(10)) and v[5] == 99.0
    s, r, v, _, _ = merge([old, new], None, None, 100, max_points=4)
    assert 99.0 in v and 5 in s


# -- the HTTP contract -------------------------------------------------------------------------


def _ingest(c, run_id: str, n: int, spike_at: int, nan_at: int, ranks=(0,)) -> None:
    assert httpx.put(f"{c.url}/api/v1/runs/{run_id}", json={"project": "q", "name": run_id}).status_code == 200
    for rank in ranks:
        for seq, lo in enumerate(range(0, n, 1000)):
            recs = []
            for s in range(lo, min(n, lo + 1000)):
                val = 1.0 + 1e-3 * math.sin(s) + rank
                val = 1e4 if s == spike_at else math.nan if s == nan_at else val
                recs.append((s, 1.7e9 + s, {"loss": val}))
            body = wire.encode_batch(wire.Batch(run_id, rank, seq, recs))
            r = httpx.post(
                f"{c.url}/api/v1/runs/{run_id}/batches",
                content=body,
                headers={"Content-Type": "application/vnd.optiscope.batch"},
            )
            assert r.status_code == 200, r.text


def test_downsampled_series_keep_the_spike_and_the_nan(collector):
    c = collector
    _ingest(c, "big", 20_000, spike_at=12_345, nan_at=17_001, ranks=(0, 1))
    full = c.api("/runs/big/series/loss?rank=0")
    assert len(full["steps"]) == 20_000 and full["downsampled"] is False and full["bucket_steps"] is None
    d = c.api("/runs/big/series/loss?max_points=200")
    assert d["downsampled"] is True and 0 < len(d["steps"]) <= 200 and d["bucket_steps"] >= 100
    pts = list(zip(d["steps"], d["ranks"], d["values"]))
    assert (12_345, 0, 1e4) in pts and (12_345, 1, 1e4) in pts  # the spike on both ranks
    assert (17_001, 0, "NaN") in pts and (17_001, 1, "NaN") in pts  # the NaN, as data
    assert pts[0][:2] == (0, 0) and pts[-1][:2] == (19_999, 1)
    one = c.api("/runs/big/series/loss?max_points=100&rank=1&start=12000&end=12999")
    assert set(one["ranks"]) == {1} and min(one["steps"]) == 12_000 and max(one["steps"]) == 12_999
    assert 1e4 in one["values"] and len(one["steps"]) <= 100


def test_compare_runs_and_export_csv(collector):
    c = collector
    _ingest(c, "a", 3000, spike_at=100, nan_at=2000)
    _ingest(c, "b", 1500, spike_at=700, nan_at=-1)
    cmp = c.api("/series?name=loss&run=a&run=b&max_points=60")
    assert cmp["name"] == "loss" and [x["run_id"] for x in cmp["runs"]] == ["a", "b"]
    a, b = cmp["runs"]
    assert a["downsampled"] and b["downsampled"] and 1e4 in a["values"] and 1e4 in b["values"]
    assert "NaN" in a["values"] and len(a["steps"]) <= 60
    r = httpx.get(f"{c.url}/api/v1/series", params={"name": "loss", "run": ["a", "nope"]})
    assert r.status_code == 404 and r.json()["reason"] == "not_found"
    r = httpx.get(f"{c.url}/api/v1/series", params={"name": "loss", "run": ["a", "bad id!"]})
    assert r.status_code == 422
    r = httpx.get(f"{c.url}/api/v1/runs/a/series/loss?max_points=3")
    assert r.status_code == 422  # too few points to keep a bucket's extremes
    r = httpx.get(f"{c.url}/api/v1/runs/a/series/loss", params={"format": "csv", "start": 1999, "end": 2001})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["step", "rank", "value"] and [row[0] for row in rows[1:]] == ["1999", "2000", "2001"]
    assert rows[2][2] == "NaN" and float(rows[1][2]) == c.api("/runs/a/series/loss?start=1999&end=1999")["values"][0]


def test_run_list_filters_sorting_and_cursor_pages(collector):
    c = collector
    made = []
    for i in range(23):
        body = {
            "project": "pa" if i % 2 else "pb",
            "name": f"run-{i:02d}",
            "config": {"lr": [1e-3, 3e-4, 0.1 + 0.2][i % 3], "opt": "adamw" if i % 4 else "sgd", "warm": i % 5 == 0},
        }
        r = httpx.put(f"{c.url}/api/v1/runs/r{i:02d}", json=body)
        assert r.status_code == 200
        made.append(r.json())
        if i % 3 == 0:
            httpx.post(f"{c.url}/api/v1/runs/r{i:02d}/finish", json={"status": "finished"}).raise_for_status()

    def ids(query):
        return [r["id"] for r in c.api("/runs?" + query)["runs"]]

    newest_first = [r["id"] for r in sorted(made, key=lambda r: (r["created_at"], r["id"]), reverse=True)]
    assert ids("limit=1000") == newest_first
    assert ids("project=pa&status=finished") == [x for x in newest_first if int(x[1:]) % 2 and int(x[1:]) % 3 == 0]
    assert ids("sort=name&order=asc&limit=5") == [f"r{i:02d}" for i in range(5)]
    # config entries, matched as JSON values: numbers, strings, booleans
    assert sorted(ids("config=lr=0.001&limit=1000")) == [f"r{i:02d}" for i in range(0, 23, 3)]
    assert sorted(ids("config=lr=0.30000000000000004&config=opt=sgd")) == [
        f"r{i:02d}" for i in range(23) if i % 3 == 2 and i % 4 == 0
    ]
    assert sorted(ids("config=warm=true")) == [f"r{i:02d}" for i in range(0, 23, 5)]
    assert ids("config=nope=1") == []
    # a time range
    lo, hi = made[5]["created_at"], made[9]["created_at"]
    assert sorted(ids(f"created_after={lo!r}&created_before={hi!r}")) == [f"r{i:02d}" for i in range(5, 9)]
    # cursor pages: every run once, in order, whatever the page size; the last page has no cursor
    for query in ("sort=name&order=desc", "sort=created_at&order=asc", "sort=updated_at&order=desc&project=pb"):
        want, got, cursor = ids(query + "&limit=1000"), [], None
        while True:
            page = c.api(f"/runs?{query}&limit=4" + (f"&cursor={cursor}" if cursor else ""))
            got += [r["id"] for r in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert got == want, query
    page = c.api("/runs?sort=name&limit=4")
    r = httpx.get(f"{c.url}/api/v1/runs", params={"sort": "created_at", "limit": 4, "cursor": page["next_cursor"]})
    assert r.status_code == 422 and r.json()["reason"] == "bad_cursor"  # a cursor of another sort
    for bad in ("garbage", "W10="):
        r = httpx.get(f"{c.url}/api/v1/runs", params={"cursor": bad})
        assert r.status_code == 422 and r.json()["reason"] == "bad_cursor"
    r = httpx.get(f"{c.url}/api/v1/runs", params={"config": "no-equals-sign"})
    assert r.status_code == 422 and r.json()["reason"] == "bad_config_filter"


def test_deleting_a_run_or_a_project_removes_everything_of_it(collector, db_url, receiver):
    """Retention: a deleted run leaves no row in any table (its alerts' webhook deliveries
    included); other runs are untouched; a running run is refused unless forced."""
    import sqlalchemy as sa

    c = collector
    for run_id, project in (("keep", "pa"), ("gone", "pa"), ("other1", "pb"), ("other2", "pb")):
        assert httpx.put(f"{c.url}/api/v1/runs/{run_id}", json={"project": project, "name": run_id}).status_code == 200
        recs = [(s, 1.7e9 + s, {"loss": math.nan if s == 3 else 1.0, "grad_norm": 2.0}) for s in range(10)]
        r = httpx.post(
            f"{c.url}/api/v1/runs/{run_id}/batches",
            content=wire.encode_batch(wire.Batch(run_id, 0, 0, recs)),
            headers={"Content-Type": "application/vnd.optiscope.batch"},
        )
        assert r.status_code == 200 and r.json()["alerts"], r.text  # the NaN loss fired an alert
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))

    def rows_of(run_ids) -> dict[str, int]:
        ids = ", ".join(f"'{r}'" for r in run_ids)
        q = {
            "runs": f"SELECT count(*) FROM runs WHERE id IN ({ids})",
            "run_ranks": f"SELECT count(*) FROM run_ranks WHERE run_id IN ({ids})",
            "series": f"SELECT count(*) FROM series WHERE run_id IN ({ids})",
            "chunks": f"SELECT count(*) FROM chunks JOIN series ON series.id = chunks.series_id WHERE run_id IN ({ids})",
            "batches": f"SELECT count(*) FROM batches WHERE run_id IN ({ids})",
            "alerts": f"SELECT count(*) FROM alerts WHERE run_id IN ({ids})",
            "outbox": f"SELECT count(*) FROM outbox JOIN alerts ON alerts.id = outbox.alert_id WHERE run_id IN ({ids})",
        }
        with engine.connect() as conn:
            return {k: conn.execute(sa.text(sql)).scalar() for k, sql in q.items()}

    before = rows_of(["gone"])
    assert all(before.values()), before  # it really had rows everywhere
    r = httpx.delete(f"{c.url}/api/v1/runs/gone")
    assert r.status_code == 409 and r.json()["reason"] == "run_active"  # still running
    assert rows_of(["gone"]) == before
    httpx.post(f"{c.url}/api/v1/runs/gone/finish", json={"status": "finished"}).raise_for_status()
    r = httpx.delete(f"{c.url}/api/v1/runs/gone")
    assert r.status_code == 200 and r.json() == {"deleted": ["gone"]}
    assert set(rows_of(["gone"]).values()) == {0}
    keep = rows_of(["keep"])
    assert all(keep.values()) and c.api("/runs/keep/series/loss")["steps"] == list(range(10))
    assert httpx.get(f"{c.url}/api/v1/runs/gone").status_code == 404
    assert httpx.delete(f"{c.url}/api/v1/runs/gone").status_code == 404
    assert "gone" not in c.metrics()
    # the id can be used again: a fresh run, with nothing of the old one
    assert httpx.put(f"{c.url}/api/v1/runs/gone", json={"project": "pa", "name": "again"}).status_code == 200
    assert c.api("/runs/gone/series")["series"] == [] and c.api("/runs/gone/alerts")["alerts"] == []
    r = httpx.post(
        f"{c.url}/api/v1/runs/gone/batches",
        content=wire.encode_batch(wire.Batch("gone", 0, 0, [(s, 1.7e9 + s, {"loss": 5.0}) for s in range(3)])),
        headers={"Content-Type": "application/vnd.optiscope.batch"},
    )
    assert r.status_code == 200 and r.json()["duplicate"] is False  # its old idempotency keys went too
    assert c.api("/runs/gone/series/loss")["values"] == [5.0] * 3
    # a project: refused while its runs run, then everything of it goes, and nothing else
    assert httpx.delete(f"{c.url}/api/v1/projects/pb").status_code == 409
    r = httpx.delete(f"{c.url}/api/v1/projects/pb", params={"force": "true"})
    assert r.status_code == 200 and r.json() == {"deleted": ["other1", "other2"]}
    assert set(rows_of(["other1", "other2"]).values()) == {0}
    assert rows_of(["keep"]) == keep
    assert httpx.delete(f"{c.url}/api/v1/projects/pb").status_code == 404
    engine.dispose()
