"""How fast the collector answers the history questions engineers ask, through the real HTTP path.

    python bench/query.py            # SQLite and PostgreSQL: a 1,000,000-point series, 10,000 runs
    python bench/query.py --mlflow   # plus MLflow's tracking server reading a whole 100,000-point series
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

A second table answers the question MLflow's `get-history` answers: a whole series, every point, no
downsampling. A second run, `full`, gets a 100,000-point `loss` (the same kind of walk; 20,000 with
--smoke) and `GET /api/v1/runs/full/series/loss` is timed like the questions above. With --mlflow,
MLflow's tracking server (bench/mlflow_baseline.py: its own venv, `mlflow server` on a SQLite store,
loopback) gets the very same points through its REST `log-batch` at 1,000 metrics per request (NaN
sent as the JSON string "NaN", as MLflow's own client sends it), and reading the whole series back
through `GET /api/2.0/mlflow/metrics/get-history` is timed over one keep-alive connection, 1 time to
warm up and then 5 times: paged at 25,000 as MlflowClient.get_metric_history pages it (all pages are
one answer), and in one unpaged request (no max_results). Every answer is checked: every step, the
NaN and the largest spike.
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
FULL_POINTS = 100_000  # the whole-series question; also the most one optiscope response holds
MLFLOW_WARMUP, MLFLOW_REPEATS = 1, 5  # each answer takes seconds
MLFLOW_PAGE = 25_000  # MlflowClient.get_metric_history's page (GET_METRIC_HISTORY_MAX_RESULTS)


def make_walk(points: int, seed: int) -> np.ndarray:
    """A loss curve: a random walk with 20 spikes of +50 and 5 NaN."""
    rng = np.random.default_rng(seed)
    walk = 3.0 + np.cumsum(rng.standard_normal(points)) * 1e-3
    spikes = rng.integers(0, points, 20)
    walk[spikes] += 50.0
    walk[rng.integers(0, points, 5)] = math.nan
    return walk


def feed_series(client: httpx.Client, url: str, run_id: str, points: int, seed: int) -> float:
    """One run whose `loss` has `points` points, in SDK-sized batches; returns the max |spike|."""
    assert client.put(f"{url}/api/v1/runs/{run_id}", json={"project": "bench", "name": run_id}).status_code == 200
    walk = make_walk(points, seed)
    for seq, lo in enumerate(range(0, points, BATCH_STEPS)):
        recs = [(s, 1.7e9 + s, {"loss": float(walk[s])}) for s in range(lo, min(points, lo + BATCH_STEPS))]
        r = client.post(
            f"{url}/api/v1/runs/{run_id}/batches",
            content=wire.encode_batch(wire.Batch(run_id, 0, seq, recs)),
            headers={"Content-Type": "application/vnd.optiscope.batch"},
        )
        r.raise_for_status()
    return float(np.nanmax(walk))


def feed_runs(url: str, n: int) -> None:
    """n runs over 10 projects; every third is finished."""

    def one(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            for k in range(i, n, 4):
                rid = f"r{k:06d}-{uuid.uuid4().hex[:6]}"
                c.put(
                    f"{url}/api/v1/runs/{rid}",
                    json={"project": f"p{k % 10}", "name": f"run {k}", "config": {"lr": 1e-3 * (1 + k % 7)}},
                ).raise_for_status()
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


def check_whole(values: list, steps: list[int], walk: np.ndarray) -> None:
    """A whole series read back: every step once, in order, the NaN (as "NaN") and the largest spike."""
    assert steps == list(range(len(walk))), (len(steps), len(walk))
    assert sum(1 for v in values if v == "NaN") == int(np.isnan(walk).sum())
    assert max(v for v in values if isinstance(v, float)) == float(np.nanmax(walk))


def local_port(r: httpx.Response) -> int | None:
    """The client side's port of the connection a response came on (one port: one keep-alive connection)."""
    stream = r.extensions.get("network_stream")
    addr = stream.get_extra_info("client_addr") if stream is not None else None
    return addr[1] if addr else None


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
            runs_ms = timed(
                client, f"{url}/api/v1/runs?project=p3&status=finished&config=lr=0.003&limit=100", check_runs
            )

            # The whole-series question, after the others so that it changes nothing they measured.
            full = min(points, FULL_POINTS)
            t0 = time.perf_counter()
            feed_series(client, url, "full", full, seed=2)
            full_fill_s = time.perf_counter() - t0
            walk, ports = make_walk(full, seed=2), set()

            def check_full(body):
                assert not body["downsampled"] and not body["truncated"]
                check_whole(body["values"], body["steps"], walk)

            def port_of(r):
                ports.add(local_port(r))

            client.event_hooks["response"].append(port_of)
            full_ms = timed(client, f"{url}/api/v1/runs/full/series/loss", check_full)
            client.event_hooks["response"].remove(port_of)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "series": series_ms,
        "runs": runs_ms,
        "fill_s": fill_s,
        "full": {"ms": full_ms, "fill_s": full_fill_s, "requests": 1, "connections": len(ports)},
    }


def measure_mlflow(points: int) -> dict | str:
    """MLflow's tracking server reading back the same whole series: ``{"version", "fill_s", "paged",
    "unpaged"}`` (each ``{"ms", "requests", "connections"}``), or why it could not be measured."""
    try:
        from mlflow_baseline import METRICS_PER_REQUEST, Unavailable, tracking_server
    except ImportError as e:
        return f"unavailable: bench/mlflow_baseline.py not importable ({e})"
    walk = make_walk(points, seed=2)
    try:
        with tracking_server(prefix="mlflow-query-") as srv:
            exp = srv.api("POST", "/api/2.0/mlflow/experiments/create", {"name": f"query-{uuid.uuid4().hex[:8]}"})
            run_id = srv.api(
                "POST",
                "/api/2.0/mlflow/runs/create",
                {"experiment_id": exp["experiment_id"], "start_time": int(time.time() * 1000), "run_name": "full"},
            )["run"]["info"]["run_id"]
            base = f"http://127.0.0.1:{srv.port}"
            with httpx.Client(base_url=base, timeout=600) as client:
                t0 = time.perf_counter()
                for lo in range(0, points, METRICS_PER_REQUEST):
                    # NaN as the JSON string "NaN", as MLflow's client sends it: a bare NaN token makes its
                    # server store a truncated batch and still answer 200.
                    metrics = [
                        {
                            "key": "loss",
                            "value": "NaN" if math.isnan(v) else v,
                            "timestamp": 1_700_000_000_000 + s,
                            "step": s,
                        }
                        for s, v in enumerate(walk[lo : lo + METRICS_PER_REQUEST].tolist(), lo)
                    ]
                    r = client.post("/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": metrics})
                    if r.status_code != 200:
                        return f"log-batch answered {r.status_code}: {r.text[:200]}"
                fill_s = time.perf_counter() - t0

                def history(page: int | None, ports: set) -> tuple[list, int]:
                    """Every point of the series, following next_page_token; and the requests it took."""
                    got, token, n = [], None, 0
                    while True:
                        q = {"run_id": run_id, "metric_key": "loss"}
                        if page is not None:
                            q["max_results"] = page
                        if token:
                            q["page_token"] = token
                        r = client.get("/api/2.0/mlflow/metrics/get-history", params=q)
                        body = r.json()
                        r.raise_for_status()
                        ports.add(local_port(r))
                        got += body.get("metrics", [])
                        n += 1
                        token = body.get("next_page_token")
                        if page is None or not token:
                            return got, n

                out = {"version": srv.version, "fill_s": fill_s}
                for label, page in (("paged", MLFLOW_PAGE), ("unpaged", None)):
                    ms, ports = [], set()
                    for i in range(MLFLOW_WARMUP + MLFLOW_REPEATS):
                        t0 = time.perf_counter()
                        got, requests = history(page, ports)
                        dt = time.perf_counter() - t0
                        got.sort(key=lambda m: int(m["step"]))  # MLflow orders by timestamp, step, value
                        check_whole([m["value"] for m in got], [int(m["step"]) for m in got], walk)
                        if i >= MLFLOW_WARMUP:
                            ms.append(dt * 1e3)
                    out[label] = {"ms": sorted(ms), "requests": requests, "connections": len(ports)}
                return out
    except Unavailable as e:
        return f"unavailable: {e}"
    except Exception as e:  # noqa: BLE001 - the baseline's own environment may misbehave here: say so in the table
        return f"failed: {type(e).__name__}: {str(e)[:300]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server to create a scratch database on")
    ap.add_argument(
        "--mlflow",
        action="store_true",
        help="add MLflow's tracking server reading the whole series (bench/mlflow_baseline.py)",
    )
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
    full = min(points, FULL_POINTS)
    mlflow = measure_mlflow(full) if args.mlflow else None
    print(
        f"# optiscope query latency: a {points:,}-point series downsampled to 2,000 points; the first page of "
        f"{runs:,} runs with a filter; {REPEATS} requests each after {WARMUP} to warm up"
    )
    print()
    print("| store | series p50 (ms) | series p95 (ms) | runs p50 (ms) | runs p95 (ms) | time to fill (s) |")
    print("|---|---|---|---|---|---|")
    for store, r in results.items():
        print(
            f"| {store} | {statistics.median(r['series']):.1f} | {pct(r['series'], 95):.1f} | "
            f"{statistics.median(r['runs']):.1f} | {pct(r['runs'], 95):.1f} | {r['fill_s']:.1f} |"
        )
    print()
    verdicts = []
    for store, r in results.items():
        s, q = statistics.median(r["series"]), statistics.median(r["runs"])
        verdicts.append(
            f"{store}: series p50 {s:.1f} ms ({'met' if s <= TARGET_SERIES_MS else 'NOT met'}), "
            f"runs p50 {q:.1f} ms ({'met' if q <= TARGET_RUNS_MS else 'NOT met'})"
        )
    print(f"targets (series <= {TARGET_SERIES_MS:.0f} ms, runs <= {TARGET_RUNS_MS:.0f} ms): " + "; ".join(verdicts))
    print()
    print(
        f"# the whole {full:,}-point series, every point, no downsampling: optiscope {REPEATS} answers after "
        f"{WARMUP} to warm up, MLflow {MLFLOW_REPEATS} after {MLFLOW_WARMUP}; one keep-alive connection each"
    )
    print()
    print("| server, store | question | p50 (ms) | p95 (ms) | requests per answer | connections | time to fill (s) |")
    print("|---|---|---|---|---|---|---|")
    rows = [(f"optiscope, {store}", "GET /api/v1/runs/{id}/series/loss", r["full"]) for store, r in results.items()]
    if isinstance(mlflow, dict):
        label = f"MLflow {mlflow['version']}, SQLite"
        rows += [
            (
                label,
                f"get-history, max_results={MLFLOW_PAGE:,} and every next_page_token (as MlflowClient)",
                {**mlflow["paged"], "fill_s": mlflow["fill_s"]},
            ),
            (label, "get-history, one request without max_results", {**mlflow["unpaged"], "fill_s": None}),
        ]
    for label, question, r in rows:
        fill = "—" if r["fill_s"] is None else f"{r['fill_s']:.1f}"
        print(
            f"| {label} | {question} | {statistics.median(r['ms']):.1f} | {pct(r['ms'], 95):.1f} | "
            f"{r['requests']} | {r['connections']} | {fill} |"
        )
    if isinstance(mlflow, str):
        print(f"| MLflow | {mlflow} | — | — | — | — | — |")
    if isinstance(mlflow, dict):
        print()
        m = statistics.median(mlflow["paged"]["ms"])
        print(
            f"MLflow's paged get-history (p50 {m / 1e3:.2f} s) against optiscope's whole-series read: "
            + "; ".join(
                f"{m / statistics.median(r['full']['ms']):.0f}x slower than {store}" for store, r in results.items()
            )
            + f"; against the {points:,}-point series downsampled to 2,000: "
            + "; ".join(
                f"{m / statistics.median(r['series']):.0f}x slower than {store}" for store, r in results.items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
