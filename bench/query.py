"""How fast the collector answers the history questions engineers ask, through the real HTTP path.

    python bench/query.py            # SQLite and PostgreSQL: a 1,000,000-point series, 10,000 runs
    python bench/query.py --smoke    # 20,000 points and 300 runs: CI runs this so the script cannot rot

For each store, `optiscope serve` is started as a subprocess under uvicorn and fed through its
ingest API the way the SDK feeds it: one run whose `loss` series has N points, sent in wire batches
of 1,000 steps (the SDK's default batch), a random walk with spikes and a few NaN; then R runs
registered over 10 projects, a third of them finished. Then, over one keep-alive connection:

  series    GET /api/v1/runs/{id}/series/loss?max_points=2000   (downsampled, extremes kept)
  runs      GET /api/v1/runs?project=p3&status=finished&config=lr=0.003&limit=100  (a filtered first page)

Each query runs 5 times to warm up, then 30 times; the table gives the median and the 95th
percentile of the wall time of each request as the client sees it (JSON decoding included).
Targets: series p50 <= 50 ms and runs p50 <= 100 ms on both stores.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import DEFAULT_PG, pct, postgres_db, start_collector  # noqa: E402

from optiscope import wire  # noqa: E402

TARGET_SERIES_MS, TARGET_RUNS_MS = 50.0, 100.0
BATCH_STEPS = 1_000
WARMUP, REPEATS = 5, 30


def feed_series(client: httpx.Client, url: str, run_id: str, points: int, seed: int) -> float:
    """One run whose `loss` has `points` points, in SDK-sized batches; returns the max |spike|."""
    assert client.put(f"{url}/api/v1/runs/{run_id}", json={"project": "bench", "name": "big"}).status_code == 200
    rng = np.random.default_rng(seed)
    walk = 3.0 + np.cumsum(rng.standard_normal(points)) * 1e-3
    spikes = rng.integers(0, points, 20)
    walk[spikes] += 50.0
    walk[rng.integers(0, points, 5)] = math.nan
    for seq, lo in enumerate(range(0, points, BATCH_STEPS)):
        recs = [(s, 1.7e9 + s, {"loss": float(walk[s])}) for s in range(lo, min(points, lo + BATCH_STEPS))]
        r = client.post(f"{url}/api/v1/runs/{run_id}/batches", content=wire.encode_batch(wire.Batch(run_id, 0, seq, recs)),
                        headers={"Content-Type": "application/vnd.optiscope.batch"})
        r.raise_for_status()
    return float(np.nanmax(walk))


def feed_runs(url: str, n: int) -> None:
    """n runs over 10 projects; every third is finished."""
    def one(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            for k in range(i, n, 4):
                rid = f"r{k:06d}-{uuid.uuid4().hex[:6]}"
                c.put(f"{url}/api/v1/runs/{rid}", json={"project": f"p{k % 10}", "name": f"run {k}",
                                                        "config": {"lr": 1e-3 * (1 + k % 7)}}).raise_for_status()
                if k % 3 == 0:
                    c.post(f"{url}/api/v1/runs/{rid}/finish", json={"status": "finished"}).raise_for_status()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(one, range(4)))


def timed(client: httpx.Client, url: str, check) -> list[float]:
    out = []
    for i in range(WARMUP + REPEATS):
        t0 = time.perf_counter()
        r = client.get(url)
        body = r.json()
        dt = time.perf_counter() - t0
        r.raise_for_status()
        check(body)
        if i >= WARMUP:
            out.append(dt * 1e3)
    return sorted(out)


def measure(db: str, workdir: Path, points: int, runs: int) -> dict:
    proc, url = start_collector(db, workdir)
    try:
        with httpx.Client(timeout=120) as client:
            t0 = time.perf_counter()
            top = feed_series(client, url, "big", points, seed=1)
            feed_runs(url, runs)
            fill_s = time.perf_counter() - t0

            def check_series(body):
                assert body["downsampled"] and len(body["steps"]) <= 2000, len(body["steps"])
                assert max(v for v in body["values"] if isinstance(v, float)) == top  # the largest spike is there
                assert "NaN" in body["values"]

            def check_runs(body):
                assert body["runs"] and all(r["project"] == "p3" and r["status"] == "finished" for r in body["runs"])
                # feed_runs: project k % 10, finished when k % 3 == 0, lr 1e-3 * (1 + k % 7)
                want = sum(1 for k in range(runs) if k % 10 == 3 and k % 3 == 0 and k % 7 == 2)
                assert len(body["runs"]) == min(100, want), (len(body["runs"]), want)

            series_ms = timed(client, f"{url}/api/v1/runs/big/series/loss?max_points=2000", check_series)
            runs_ms = timed(client, f"{url}/api/v1/runs?project=p3&status=finished&config=lr=0.003&limit=100",
                            check_runs)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"series": series_ms, "runs": runs_ms, "fill_s": fill_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server to create a scratch database on")
    args = ap.parse_args()
    points, runs = (20_000, 300) if args.smoke else (1_000_000, 10_000)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        results["SQLite"] = measure(f"sqlite:///{work / 'query.db'}", work, points, runs)
        pg, drop = postgres_db(args.pg)
        try:
            results["PostgreSQL"] = measure(pg, work, points, runs)
        finally:
            drop()
    print(f"# optiscope query latency: a {points:,}-point series downsampled to 2,000 points; the first page of "
          f"{runs:,} runs with a filter; {REPEATS} requests each after {WARMUP} to warm up")
    print()
    print("| store | series p50 (ms) | series p95 (ms) | runs p50 (ms) | runs p95 (ms) | time to fill (s) |")
    print("|---|---|---|---|---|---|")
    for store, r in results.items():
        print(f"| {store} | {statistics.median(r['series']):.1f} | {pct(r['series'], 95):.1f} | "
              f"{statistics.median(r['runs']):.1f} | {pct(r['runs'], 95):.1f} | {r['fill_s']:.1f} |")
    print()
    verdicts = []
    for store, r in results.items():
        s, q = statistics.median(r["series"]), statistics.median(r["runs"])
        verdicts.append(f"{store}: series p50 {s:.1f} ms ({'met' if s <= TARGET_SERIES_MS else 'NOT met'}), "
                        f"runs p50 {q:.1f} ms ({'met' if q <= TARGET_RUNS_MS else 'NOT met'})")
    print(f"targets (series <= {TARGET_SERIES_MS:.0f} ms, runs <= {TARGET_RUNS_MS:.0f} ms): " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
