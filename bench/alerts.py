"""How long an alert takes from the point that triggers it to a webhook receiver, through the real collector.

    python bench/alerts.py                  # SQLite and PostgreSQL: 200 incidents idle, 200 under ingest load
    python bench/alerts.py --store sqlite   # one store (sqlite, postgresql or both)
    python bench/alerts.py --load 0         # idle only
    python bench/alerts.py --smoke          # 10 incidents per store, no load: CI runs this so the script cannot rot

For each store, `optiscope serve --allow-internal-webhooks` is started as a subprocess under uvicorn
(SQLite in a scratch directory; PostgreSQL in a fresh database made on --pg and dropped afterwards),
and one endpoint is added through the API (`POST /api/v1/webhooks`, native format, every project,
signed with the secret it answers). The endpoint is a `ThreadingHTTPServer` on 127.0.0.1 inside
this script, so the sender and the receiver read the same clock (`time.perf_counter`). The receiver
notes the time once it has read a delivery's whole body, answers 200, and verifies the Standard
Webhooks signature on its own (`webhook-signature: v1,<base64 HMAC-SHA256>` of
`"{webhook-id}.{webhook-timestamp}." + body` under the base64-decoded secret; a timestamp more than
5 minutes off fails too): a delivery that does not verify is counted and makes the script exit 1.

An incident is a wire batch (version 2, one step) whose `loss` is NaN, posted to one of 10 runs in
turn over one keep-alive connection; its latency is the receiver's time of the `alert.firing`
delivery for that run and step minus the time taken just before the batch was posted. The next
batch of that run carries a finite `loss`, which resolves the incident; its `alert.resolved`
delivery is timed the same way (second table). Each delivery is awaited (10 s at most, then it
counts as missing and the script exits 1) before the next batch is posted, so incidents never
overlap and every NaN opens a new incident (the detector fires once per incident per run, rank and
series). The first 3 incidents of each condition warm up and are not counted.

Baseline in the same run: the ingest request's own latency (post -> 200, which the collector answers
only after the commit) of the very batches that fired; an alert cannot reach anyone before its
point is committed, so `alert p50 / ingest p50` is what delivery adds on top of storing.

Under load, --load trainer processes (separate processes, as in bench/ingest.py, so that their
encoding does not hold this process's GIL while the receiver reads the clock) each register their
own run and send bench/ingest.py's batches (100 steps x 300 series, some NaN and Inf in per-tensor
series, none in `loss`) back to back for as long as the incidents take; their throughput is
printed below the tables. Target (from the issue): p99 <= 1 s from the post to the receiver.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import DEFAULT_PG, Trainer, each_store, pct, start_collector  # noqa: E402

from optiscope import wire  # noqa: E402

P99_TARGET_MS = 1000.0
RUNS = 10  # incidents go to these runs in turn
DELIVERY_TIMEOUT_S = 10.0  # after this a delivery counts as missing
TIMESTAMP_TOLERANCE_S = 300  # Standard Webhooks' recommended tolerance
LOAD_WARMUP_S = 1.5  # the trainers are sending before the first incident under load


# -- the webhook receiver ----------------------------------------------------------------------
def verify(secret: str, headers: dict, body: bytes, now: float) -> bool:
    """A Standard Webhooks signature, checked from the scheme (not with the collector's own code)."""
    msg_id, ts, sigs = headers.get("webhook-id"), headers.get("webhook-timestamp"), headers.get("webhook-signature")
    if not (msg_id and ts and sigs and secret.startswith("whsec_")):
        return False
    try:
        if abs(now - int(ts)) > TIMESTAMP_TOLERANCE_S:
            return False
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        return False
    want = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(want, s[3:]) for s in sigs.split(" ") if s.startswith("v1,"))


class Receiver:
    """Notes each delivery's time of receipt under (run, event type, step) and checks its signature."""

    def __init__(self):
        self.secret = ""  # set once the endpoint exists; nothing is delivered before
        self.cond = threading.Condition()
        self.got: dict[tuple[str, str, int], float] = {}
        self.ids: set[str] = set()
        self.deliveries = self.bad_signatures = self.duplicates = self.unreadable = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                t = time.perf_counter()
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                receiver.record(t, {k.lower(): v for k, v in self.headers.items()}, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()

    def record(self, t: float, headers: dict, body: bytes) -> None:
        ok = verify(self.secret, headers, body, time.time())
        try:
            ev = json.loads(body)
            key = (ev["run"]["id"], ev["type"], int(ev["alert"]["step"]))
        except (ValueError, KeyError, TypeError):
            key = None
        with self.cond:
            self.deliveries += 1
            self.bad_signatures += not ok
            if key is None:
                self.unreadable += 1
            elif headers.get("webhook-id") in self.ids or key in self.got:
                self.duplicates += 1  # at-least-once: a repeat keeps the first time of receipt
            else:
                self.got[key] = t
            self.ids.add(headers.get("webhook-id"))
            self.cond.notify_all()

    def wait(self, key: tuple[str, str, int], timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: key in self.got, timeout)
            return self.got.get(key)

    def counts(self) -> dict:
        with self.cond:
            return {
                "deliveries": self.deliveries,
                "bad_signatures": self.bad_signatures,
                "duplicates": self.duplicates,
                "unreadable": self.unreadable,
            }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the collector and the load ----------------------------------------------------------------
def loader(url: str, n_series: int, steps: int, seed: int, stop, out) -> None:
    """One trainer's process: its own run, bench/ingest.py's batches back to back until stop is set."""
    from optiscope.transport.http import HttpClient

    run_id = f"load-{uuid.uuid4().hex[:12]}"
    client = HttpClient(url, timeout=60)
    status, _, payload = client.request("PUT", f"/api/v1/runs/{run_id}", {"project": "bench-load", "name": run_id})
    assert status == 200, payload
    trainer = Trainer(run_id, n_series, steps, seed)
    done, refused = [], 0  # (completion time, latency, points) of each batch answered 2xx
    while not stop.is_set():
        body = trainer.batch()
        t0 = time.perf_counter()
        status, _, _ = client.request("POST", f"/api/v1/runs/{run_id}/batches", body)
        t1 = time.perf_counter()
        if 200 <= status < 300:
            done.append((time.time(), t1 - t0, trainer.per_batch))
        else:
            refused += 1
    out.send({"done": done, "refused": refused})
    out.close()


# -- the incidents -----------------------------------------------------------------------------
class Runs:
    """The runs incidents go to, each with its next step and batch sequence number."""

    def __init__(self, client: httpx.Client, url: str, label: str, n: int = RUNS):
        self.client, self.url = client, url
        self.ids = [f"alerts-{label}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
        self.seq = dict.fromkeys(self.ids, 0)
        for rid in self.ids:
            r = client.put(f"{url}/api/v1/runs/{rid}", json={"project": "bench", "name": rid})
            r.raise_for_status()

    def post(self, rid: str, value: float) -> tuple[int, float, float, httpx.Response]:
        """One step whose loss is value: (step, time just before the post, time of the answer, answer)."""
        seq = self.seq[rid]
        self.seq[rid] += 1
        body = wire.encode_batch(wire.Batch(rid, 0, seq, [(seq, time.time(), {"loss": value})]))
        t0 = time.perf_counter()
        r = self.client.post(
            f"{self.url}/api/v1/runs/{rid}/batches",
            content=body,
            headers={"Content-Type": "application/vnd.optiscope.batch"},
        )
        return seq, t0, time.perf_counter(), r


def incidents(runs: Runs, receiver: Receiver, n: int, warmup: int) -> dict:
    fired, resolved, ingest = [], [], []  # milliseconds, the counted incidents only
    missing = no_alert = 0
    for i in range(warmup + n):
        rid = runs.ids[i % len(runs.ids)]
        for value, kind, out in ((math.nan, "alert.firing", fired), (1.0, "alert.resolved", resolved)):
            step, t0, t1, r = runs.post(rid, value)
            if r.status_code != 200 or len(r.json()["alerts"]) != 1:
                no_alert += 1  # the point did not open (or close) exactly one alert
                continue
            t = receiver.wait((rid, kind, step), DELIVERY_TIMEOUT_S)
            if t is None:
                missing += 1
            elif i >= warmup:
                out.append(1e3 * (t - t0))
                if kind == "alert.firing":
                    ingest.append(1e3 * (t1 - t0))
    return {
        "fired": sorted(fired),
        "resolved": sorted(resolved),
        "ingest": sorted(ingest),
        "missing": missing,
        "no_alert": no_alert,
        "n": n,
    }


def measure(db: str, workdir: Path, args) -> dict:
    receiver = Receiver()
    proc, url = start_collector(db, workdir, ["--allow-internal-webhooks"])
    try:
        with httpx.Client(timeout=60) as client:
            r = client.post(f"{url}/api/v1/webhooks", json={"url": receiver.url})
            if r.status_code != 201 or not str(r.json().get("secret", "")).startswith("whsec_"):
                raise RuntimeError(f"POST /api/v1/webhooks answered {r.status_code}: {r.text[:300]}")
            receiver.secret = r.json()["secret"]
            out = {"idle": incidents(Runs(client, url, "idle"), receiver, args.n, args.warmup)}
            if args.load:
                ctx = mp.get_context("spawn")  # this process has threads (the receiver): no fork
                stop = ctx.Event()
                pipes, procs = [], []
                for i in range(args.load):
                    recv, send = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=loader, args=(url, args.series, args.steps, i, stop, send), daemon=True)
                    p.start()
                    pipes.append(recv)
                    procs.append(p)
                try:
                    runs = Runs(client, url, "load")
                    deadline = time.monotonic() + 60  # spawned trainers import numpy first

                    def registered() -> int:
                        return len(client.get(f"{url}/api/v1/runs?project=bench-load").json().get("runs", []))

                    while registered() < args.load and time.monotonic() < deadline:
                        time.sleep(0.2)
                    time.sleep(LOAD_WARMUP_S)
                    w0 = time.time()
                    res = incidents(runs, receiver, args.n, args.warmup)
                    w1 = time.time()
                finally:
                    stop.set()
                results = [pipe.recv() for pipe in pipes]
                for p in procs:
                    p.join(30)
                done = [d for r in results for d in r["done"] if w0 <= d[0] < w1]
                res["load"] = {
                    "trainers": args.load,
                    "points_per_s": sum(d[2] for d in done) / (w1 - w0),
                    "batch_p50_ms": statistics.median(1e3 * d[1] for d in done) if done else math.nan,
                    "batches": len(done),
                    "refused": sum(r["refused"] for r in results),
                    "per_batch": Trainer("x", args.series, args.steps, 0).per_batch,
                }
                out["under load"] = res
            time.sleep(0.3)  # a late repeat would still be counted
            out["receiver"] = receiver.counts()
            return out
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        receiver.close()


def ms(xs: list[float], q: float | None = None) -> str:
    if not xs:
        return "—"
    return f"{statistics.median(xs) if q is None else pct(xs, q):.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="10 incidents per store, no load (CI)")
    ap.add_argument("--n", type=int, default=None, help="incidents per condition and store (default 200)")
    ap.add_argument("--warmup", type=int, default=3, help="incidents before the counted ones (default 3)")
    ap.add_argument(
        "--load",
        type=int,
        default=None,
        help="trainer processes sending during the second condition (default 3; 0: idle only)",
    )
    ap.add_argument("--series", type=int, default=300, help="series per step of the load's batches (default 300)")
    ap.add_argument("--steps", type=int, default=100, help="steps per batch of the load (default 100)")
    ap.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server for the PostgreSQL rows (a database is made)")
    args = ap.parse_args()
    if args.n is None:
        args.n = 10 if args.smoke else 200
    if args.load is None:
        args.load = 0 if args.smoke else 3

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optiscope-bench-") as tmp:
        rows: dict[str, dict | str] = each_store(args, Path(tmp), measure, "alerts.db")

    conditions = ("idle", "under load") if args.load else ("idle",)
    print(
        f"# optiscope alert latency: a NaN `loss` posted -> its signed alert.firing at a webhook receiver on "
        f"loopback; {args.n} incidents per row after {args.warmup} to warm up"
        + (f"; load: {args.load} trainers of {args.series} series x {args.steps} steps per batch" if args.load else "")
        + f"; {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| store | condition | N | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | ingest p50 (ms) | "
        "alert p50 / ingest p50 | signature failures | missing | p99 <= 1000 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for store, r in rows.items():
        if isinstance(r, str):
            print(f"| {store} | {r} | — | — | — | — | — | — | — | — | — | — |")
            continue
        bad = r["receiver"]["bad_signatures"] + r["receiver"]["unreadable"]
        ok &= bad == 0
        for cond in conditions:
            c = r[cond]
            f, g = c["fired"], c["ingest"]
            ok &= c["missing"] == 0 and c["no_alert"] == 0 and len(f) == c["n"]
            ratio = f"{statistics.median(f) / statistics.median(g):.1f}x" if f and g else "—"
            met = "met" if f and pct(f, 99) <= P99_TARGET_MS else "NOT met"
            print(
                f"| {store} | {cond} | {len(f)} | {ms(f)} | {ms(f, 95)} | {ms(f, 99)} | {ms(f, 100)} | {ms(g)} | "
                f"{ratio} | {bad} | {c['missing'] + c['no_alert']} | {met} |"
            )
    print()
    print("# the finite `loss` that resolves each incident -> its signed alert.resolved")
    print()
    print("| store | condition | N | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|---|")
    for store, r in rows.items():
        if isinstance(r, dict):
            for cond in conditions:
                x = r[cond]["resolved"]
                ok &= len(x) == r[cond]["n"]
                print(f"| {store} | {cond} | {len(x)} | {ms(x)} | {ms(x, 95)} | {ms(x, 99)} | {ms(x, 100)} |")
    print()
    for store, r in rows.items():
        if not isinstance(r, dict):
            continue
        rc = r["receiver"]
        print(
            f"{store}: {rc['deliveries']} deliveries received, {rc['bad_signatures']} failed the signature check, "
            f"{rc['unreadable']} unreadable, {rc['duplicates']} repeats; "
            + "; ".join(
                f"{cond}: {r[cond]['missing']} missing, {r[cond]['no_alert']} points that did not open or "
                f"close exactly one alert"
                for cond in conditions
            )
        )
        if "under load" in r:
            ld = r["under load"]["load"]
            print(
                f"{store} load: {ld['trainers']} trainers, {ld['points_per_s']:,.0f} points/s acknowledged during "
                f"the incidents ({ld['batches']} batches of {ld['per_batch']:,} points, p50 {ld['batch_p50_ms']:.0f} ms"
                f", {ld['refused']} refused)"
            )
    verdicts = [
        f"{store} {cond} p99 {pct(r[cond]['fired'], 99):.1f} ms "
        f"({'met' if r[cond]['fired'] and pct(r[cond]['fired'], 99) <= P99_TARGET_MS else 'NOT met'})"
        for store, r in rows.items()
        if isinstance(r, dict)
        for cond in conditions
    ]
    print(f"targets: alert p99 <= {P99_TARGET_MS:.0f} ms: " + "; ".join(verdicts))
    print(
        f"delivery: {'every alert arrived, signed correctly' if ok else 'FAILED (a delivery missing or unverified)'}"
        f"; {time.monotonic() - started:.0f} s in all"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
