"""How many points a second one collector stores durably, through the real HTTP path, in one run.

    python bench/ingest.py                  # SQLite and PostgreSQL, 4 trainers, 3 rounds of 5 s each
    python bench/ingest.py --mlflow         # plus MLflow's tracking server fed the same way (bench/mlflow_baseline.py)
    python bench/ingest.py --smoke          # tiny batches, one short round: CI runs this so the script cannot rot

Each simulated trainer is its own process with its own run: it sends wire batches the way the SDK
does (version 2, one keep-alive connection, the next batch when the last one is answered) to
`optiscope serve` started as a subprocess under uvicorn. A batch is 100 steps of about 300 series
named like a transformer's per-tensor statistics (`grad_norm/param/blocks.3.attn.in_proj_weight`);
a third of the per-tensor series are logged every 5th step only, and some values are NaN or +-Inf.
A point counts once its batch is answered 2xx, which the collector does only after the commit.
Throughput is the median over rounds of the points answered within each round; latencies are of
every batch answered within the rounds. After the rounds the script checks that the store holds
exactly the points that were acknowledged.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from optiscope import wire
from optiscope.transport.http import HttpClient

DEFAULT_PG = os.environ.get("OPTISCOPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGETS = {"SQLite": 1_000_000, "PostgreSQL": 300_000}
P99_TARGET_MS = 250.0
MODULES = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln1.weight",
    "ln1.bias",
    "ln2.weight",
    "ln2.bias",
    "ff.0.weight",
    "ff.0.bias",
    "ff.2.weight",
    "ff.2.bias",
)
STATS = ("grad_norm", "param_norm", "update_ratio", "update_rms", "v_underestimation", "eps_headroom")
SPARSE_EVERY = 5


def series_names(n: int) -> list[str]:
    """The global catalog series, then per-tensor series of a transformer, until there are n."""
    names = [s for s in wire.EXPORTED_SERIES][: n // 10 or 1]
    block = 0
    while len(names) < n:
        for stat in STATS:
            for mod in MODULES:
                names.append(f"{stat}/param/blocks.{block}.{mod}")
        block += 1
    return names[:n]


class Trainer:
    """Makes the batches of one simulated rank: column by column, as the SDK's encoder receives them."""

    def __init__(self, run_id: str, n_series: int, steps: int, seed: int):
        self.run_id, self.steps = run_id, steps
        self.names = series_names(n_series)
        self.rng = np.random.default_rng(seed)
        n_global = sum(1 for n in self.names if "/param/" not in n)
        # every third per-tensor series is a sampled one: present on every SPARSE_EVERY-th step only
        self.sparse = [i >= n_global and i % 3 == 0 for i in range(n_series)]
        bits = np.zeros(steps, dtype=bool)
        bits[::SPARSE_EVERY] = True
        self.mask = np.packbits(bits, bitorder="little").tobytes()
        self.per_batch = sum(int(bits.sum()) if sp else steps for sp in self.sparse)
        self.seq = 0

    def batch(self) -> bytes:
        n, k = self.steps, len(range(0, self.steps, SPARSE_EVERY))
        first = self.seq * n
        values = self.rng.standard_normal((len(self.names), n))
        # a few non-finite values per batch, in per-tensor series (a NaN loss would page on every batch)
        rows = self.rng.integers(len(self.names) // 10 + 1, len(self.names), size=6)
        values[rows, self.rng.integers(0, k, size=6)] = self.rng.choice([np.nan, np.inf, -np.inf], size=6)
        cols = [
            wire.Column(name, values[i, :k] if sp else values[i], self.mask if sp else None)
            for i, (name, sp) in enumerate(zip(self.names, self.sparse))
        ]
        steps = np.arange(first, first + n, dtype=np.int64)
        body = wire.encode_columns(wire.Columns(self.run_id, 0, self.seq, steps, time.time() + steps * 1e-3, cols))
        self.seq += 1
        return body


def sender(url: str, n_series: int, steps: int, seed: int, start_at: float, stop_at: float, out) -> None:
    """One trainer's process: register, then send batches back to back until stop_at."""
    run_id = f"bench-{uuid.uuid4().hex[:16]}"
    client = HttpClient(url, timeout=60)
    status, _, payload = client.request("PUT", f"/api/v1/runs/{run_id}", {"project": "bench", "name": run_id})
    assert status == 200, payload
    trainer = Trainer(run_id, n_series, steps, seed)
    done, acked, refused = [], 0, 0  # (completion time, latency, points) of each batch answered 2xx
    while time.time() < start_at:
        time.sleep(0.001)
    while time.time() < stop_at:
        body = trainer.batch()
        t0 = time.perf_counter()
        status, _, payload = client.request("POST", f"/api/v1/runs/{run_id}/batches", body)
        t1 = time.perf_counter()
        if 200 <= status < 300:
            done.append((time.time(), t1 - t0, trainer.per_batch))
            acked += trainer.per_batch
        else:
            refused += 1
    out.send(
        {
            "run_id": run_id,
            "done": done,
            "acked": acked,
            "refused": refused,
            "batches": trainer.seq,
            "per_batch": trainer.per_batch,
            "steps": steps,
        }
    )
    out.close()


def start_collector(db: str, workdir: Path, extra: tuple[str, ...] | list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`optiscope serve` on a free loopback port (``extra``: more of its arguments), once healthy."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "optiscope"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "optiscope.cli"]
    log_path = workdir / f"collector-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd + ["serve", "--port", str(port), "--db", db, "--log-level", "warning", *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("collector did not become healthy")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def ingested_points(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("optiscope_ingest_points_total "):
                return float(line.split()[1])
    return 0.0


def measure(db: str, workdir: Path, args) -> dict:
    proc, url = start_collector(db, workdir)
    try:
        ctx = mp.get_context("fork")
        start_at = time.time() + 1.0  # every trainer registered and waiting
        window0 = start_at + args.warmup
        stop_at = window0 + args.rounds * args.duration
        pipes, procs = [], []
        for i in range(args.senders):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=sender, args=(url, args.series, args.steps, i, start_at, stop_at, send))
            p.start()
            pipes.append(recv)
            procs.append(p)
        cpu = []  # the collector's CPU seconds at the start and the end of the rounds
        for at in (window0, stop_at):
            time.sleep(max(0.0, at - time.time()))
            cpu.append(cpu_seconds(proc.pid))
        results = [r.recv() for r in pipes]
        for p in procs:
            p.join()
        done = [d for r in results for d in r["done"]]
        rounds = []
        for k in range(args.rounds):
            lo, hi = window0 + k * args.duration, window0 + (k + 1) * args.duration
            rounds.append(sum(n for t, _, n in done if lo <= t < hi) / args.duration)
        lat = sorted(1e3 * dt for t, dt, _ in done if window0 <= t < stop_at)
        acked = sum(r["acked"] for r in results)
        # The store holds exactly what was acknowledged: the collector's own count, and one series read back.
        stored = ingested_points(url)
        r0 = results[0]
        t0 = time.perf_counter()
        back = get(f"{url}/api/v1/runs/{r0['run_id']}/series/{series_names(args.series)[0]}")
        t1 = time.perf_counter()
        get(f"{url}/api/v1/runs/{r0['run_id']}")  # the newest point of every series
        t2 = time.perf_counter()
        get(f"{url}/api/v1/runs/{r0['run_id']}/series/{series_names(args.series)[-1]}?start={len(back['steps']) // 2}")
        t3 = time.perf_counter()
        queries = {
            "series_points": len(back["steps"]),
            "series_ms": 1e3 * (t1 - t0),
            "run_ms": 1e3 * (t2 - t1),
            "range_ms": 1e3 * (t3 - t2),
        }
        dense_ok = back["steps"] == list(range(len(r0["done"]) * r0["steps"])) if not r0["refused"] else False
        points = sum(n for t, _, n in done if window0 <= t < stop_at)
        cpu_ms = 1e6 * (cpu[1] - cpu[0]) / points if None not in cpu and points else math.nan  # per 1,000 points
        return {
            "points_per_s": statistics.median(rounds),
            "cpu_ms_per_kpoint": cpu_ms,
            "rounds": rounds,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "batches": len(lat),
            "acked": acked,
            "stored": stored,
            "refused": sum(r["refused"] for r in results),
            "read_back": dense_ok,
            "per_batch": r0["per_batch"],
            "queries": queries,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]  # nearest rank


def postgres_db(admin_url: str):
    """A fresh database on the PostgreSQL server at admin_url, and a function that drops it."""
    import psycopg

    admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    name = f"optiscope_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def drop():
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return f"{base}/{name}", drop


def mlflow_row(args) -> dict | str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from mlflow_baseline import run_baseline
    except ImportError as e:
        return f"bench/mlflow_baseline.py not available ({e})"
    try:
        got = run_baseline(duration_s=args.duration * args.rounds, senders=args.senders)
    except Exception as e:  # noqa: BLE001 - the baseline's own environment may not be buildable here
        return f"unavailable: {type(e).__name__}: {e}"
    return got or "unavailable: its virtual environment could not be made"


def each_store(args, tmp: Path, measure, db_name: str) -> dict:
    """``measure(db_url, workdir, args)`` on SQLite and PostgreSQL as ``args.store`` asks (a fresh
    database on ``args.pg``, dropped after); a PostgreSQL that cannot be used is a row saying why."""
    rows: dict = {}
    if args.store in ("sqlite", "both"):
        rows["SQLite"] = measure(f"sqlite:///{tmp / db_name}", tmp, args)
    if args.store in ("postgresql", "both"):
        try:
            url, drop = postgres_db(args.pg)
        except Exception as e:  # noqa: BLE001 - no usable server: say so in the table
            rows["PostgreSQL"] = f"unavailable: {e}"
        else:
            try:
                rows["PostgreSQL"] = measure(url, tmp, args)
            finally:
                drop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny batches, one short round (CI)")
    ap.add_argument("--senders", type=int, default=None, help="trainer processes (default 4)")
    ap.add_argument("--series", type=int, default=None, help="series per step (default 300)")
    ap.add_argument("--steps", type=int, default=None, help="steps per batch (default 100)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per round (default 5)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per store (default 3)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the first round (default 2)")
    ap.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server for the PostgreSQL row (a database is made)")
    ap.add_argument("--mlflow", action="store_true", help="add MLflow's tracking server as the baseline row")
    args = ap.parse_args()
    smoke = dict(senders=2, series=40, steps=10, duration=1.0, rounds=1, warmup=0.3)
    full = dict(senders=4, series=300, steps=100, duration=5.0, rounds=3, warmup=2.0)
    for k, v in (smoke if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    with tempfile.TemporaryDirectory(prefix="optiscope-bench-") as tmp:
        rows = each_store(args, Path(tmp), measure, "bench.db")
    if args.mlflow:
        rows["MLflow (log-batch)"] = mlflow_row(args)

    per_batch = next((r["per_batch"] for r in rows.values() if isinstance(r, dict) and "per_batch" in r), 0)
    print(
        f"# optiscope ingest: {args.senders} trainers, {args.series} series x {args.steps} steps per batch "
        f"({per_batch:,} points), {args.rounds} round(s) of {args.duration:g} s, {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| store | points/s (median of rounds) | rounds | p50 batch (ms) | p99 batch (ms) | batches | "
        "collector CPU (ms per 1,000 points) |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        if isinstance(r, str):
            print(f"| {label} | {r} | — | — | — | — | — |")
            continue
        rounds = " / ".join(f"{x:,.0f}" for x in r.get("rounds", [])) or "—"
        cpu = "—" if math.isnan(r.get("cpu_ms_per_kpoint", math.nan)) else f"{r['cpu_ms_per_kpoint']:.3f}"
        print(
            f"| {label} | {r['points_per_s']:,.0f} | {rounds} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r.get('batches', '—')} | {cpu} |"
        )
    print()
    for label, r in rows.items():
        if isinstance(r, dict) and "acked" in r:
            q = r["queries"]
            print(
                f"{label}: {r['acked']:,} points acknowledged, {r['stored']:,.0f} stored, {r['refused']} batches "
                f"refused, one series read back complete: {r['read_back']}; afterwards a run's whole `loss` "
                f"({q['series_points']:,} points) read in {q['series_ms']:.0f} ms, its summary in {q['run_ms']:.0f} ms, "
                f"half of a per-tensor series in {q['range_ms']:.0f} ms"
            )
    base = rows.get("MLflow (log-batch)")
    ok = True
    for label, target in TARGETS.items():
        r = rows.get(label)
        if isinstance(r, dict):
            met = r["points_per_s"] >= target and r["p99_ms"] < P99_TARGET_MS
            ok &= r["acked"] == r["stored"] and r["read_back"] and not r["refused"]
            ratio = f", {r['points_per_s'] / base['points_per_s']:.0f}x MLflow" if isinstance(base, dict) else ""
            print(
                f"targets: {label} >= {target:,} points/s and p99 < {P99_TARGET_MS:.0f} ms: "
                f"{'met' if met else 'not met'} ({r['points_per_s']:,.0f} points/s, p99 {r['p99_ms']:.1f} ms{ratio})"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
