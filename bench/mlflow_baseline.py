"""The baseline the ingest benchmark is measured against: MLflow's tracking server, fed through its
REST ``log-batch`` endpoint at 1,000 metrics per request.

    python bench/mlflow_baseline.py [--duration S] [--senders N]

MLflow lives in its own virtual environment (``bench/.mlflow-venv``, made on first use with the
version pinned below, reused after) so that it never meets optiscope's dependencies. The server is
started as a user starts it (``mlflow server``, its defaults, a SQLite backend store in a temporary
directory, on loopback); ``senders`` processes post batches of realistic per-tensor metric names
with increasing steps for ``duration_s`` seconds. Durable points are those of requests answered
200: MLflow's SQL store commits a batch before it answers. ``bench/ingest.py --mlflow`` imports
``run_baseline``; ``bench/query.py --mlflow`` starts its own server with ``tracking_server``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

MLFLOW_VERSION = "3.17.2"  # 3.18.0's mlflow-tracing dependency was not installable here
VENV = Path(__file__).resolve().parent / ".mlflow-venv"
METRICS_PER_REQUEST = 1_000  # MLflow's own limit for one log-batch request
SERIES = 250  # series per simulated trainer: a request carries 4 steps of each
INSTALL_TIMEOUT = 1_200.0
START_TIMEOUT = 180.0  # the first start migrates a fresh SQLite store
REQUEST_TIMEOUT = 60.0


def series_names(n: int = SERIES) -> list[str]:
    """Per-tensor names as a transformer's training logs them."""
    tensors = ["tok_emb.weight", "pos_emb.weight", "ln_f.weight", "head.weight"]
    for b in range(12):
        tensors += [
            f"blocks.{b}.{t}"
            for t in (
                "attn.in_proj_weight",
                "attn.in_proj_bias",
                "attn.out_proj.weight",
                "ln1.weight",
                "ln2.weight",
                "ff.0.weight",
                "ff.0.bias",
                "ff.2.weight",
                "ff.2.bias",
            )
        ]
    names = ["loss", "lr", "grad_norm", "update_ratio"]
    for stat in ("grad_norm", "update_ratio", "param_norm"):
        names += [f"{stat}/param/{t}" for t in tensors]
    return names[:n]


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _installed_version() -> str | None:
    py = _venv_python()
    if not py.exists():
        return None
    try:
        r = subprocess.run(
            [str(py), "-c", "import mlflow; print(mlflow.__version__)"], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


class Unavailable(RuntimeError):
    """MLflow cannot be installed or started here; the message says why, in one line."""


def make_venv() -> tuple[str | None, str | None]:
    """(the venv's MLflow version, None), making the venv first if needed; (None, why) on failure,
    the details printed."""
    if _installed_version() == MLFLOW_VERSION:
        return MLFLOW_VERSION, None
    print(
        f"mlflow baseline: installing mlflow=={MLFLOW_VERSION} into {VENV.name}/ (once; a few minutes)", file=sys.stderr
    )
    base = getattr(sys, "_base_executable", sys.executable)  # not a venv's python: no nesting
    try:
        if not _venv_python().exists():
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True, text=True, timeout=300)
        subprocess.run(
            [str(_venv_python()), "-m", "pip", "install", "--quiet", f"mlflow=={MLFLOW_VERSION}"],
            check=True,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
    except subprocess.CalledProcessError as e:
        print(
            f"mlflow baseline: cannot make the MLflow venv ({' '.join(map(str, e.cmd[:4]))} ...):\n"
            f"{(e.stderr or '')[-3000:]}",
            file=sys.stderr,
        )
        last = next((line.strip() for line in reversed((e.stderr or "").splitlines()) if line.strip()), "")
        return (
            None,
            f"cannot make its venv ({Path(str(e.cmd[0])).name} {' '.join(map(str, e.cmd[1:4]))} ... "
            f"exited {e.returncode}{': ' + last[:200] if last else ''})",
        )
    except (subprocess.TimeoutExpired, OSError) as e:
        print(f"mlflow baseline: cannot make the MLflow venv: {e}", file=sys.stderr)
        return None, f"cannot make its venv ({type(e).__name__}: {str(e)[:200]})"
    version = _installed_version()
    if version != MLFLOW_VERSION:
        print(f"mlflow baseline: the venv has mlflow {version!r}, not {MLFLOW_VERSION}", file=sys.stderr)
        return None, f"its venv has mlflow {version!r}, not {MLFLOW_VERSION}"
    return version, None


def ensure_venv() -> str | None:
    """The venv's MLflow version, making the venv first if needed; None (reason printed) on failure."""
    return make_venv()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(conn: http.client.HTTPConnection, method: str, path: str, doc=None) -> tuple[int, bytes]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode() if doc is not None else None
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    resp = conn.getresponse()
    return resp.status, resp.read()


def _api(port: int, method: str, path: str, doc=None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        status, payload = _call(conn, method, path, doc)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"{method} {path}: {status} {payload[:500]!r}")
    return json.loads(payload)


def _sender(port: int, run_id: str, start_at: float, stop_at: float, out) -> None:
    """One simulated trainer: log-batch requests of METRICS_PER_REQUEST points, steps increasing."""
    names = series_names()
    per_request = METRICS_PER_REQUEST // len(names)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    ok, failed, latencies, step, errors = 0, 0, [], 0, {}
    time.sleep(max(0.0, start_at - time.time()))  # all senders begin together
    while time.time() < stop_at:
        ts = int(time.time() * 1000)
        metrics = [
            {"key": k, "value": 1.0 / (1 + s + i), "timestamp": ts, "step": s}
            for s in range(step, step + per_request)
            for i, k in enumerate(names)
        ]
        step += per_request
        body = json.dumps({"run_id": run_id, "metrics": metrics}).encode()  # encoded before the clock starts
        t0 = time.perf_counter()
        try:
            status, payload = _call(conn, "POST", "/api/2.0/mlflow/runs/log-batch", body)
        except (OSError, http.client.HTTPException) as e:
            status, payload = None, str(e).encode()
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        latencies.append(time.perf_counter() - t0)
        if status == 200:
            ok += 1
        else:
            failed += 1
            errors.setdefault(str(status), payload[:300].decode(errors="replace"))
    conn.close()
    out.put(
        {
            "run_id": run_id,
            "ok": ok,
            "failed": failed,
            "latencies": latencies,
            "steps": step,
            "errors": errors,
            "ended": time.time(),
        }
    )


def _start_server(port: int, work: Path) -> subprocess.Popen:
    log = open(work / "mlflow-server.log", "w")
    args = [
        str(VENV / "bin" / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{work / 'mlflow.db'}",
        "--default-artifact-root",
        (work / "artifacts").as_uri(),
    ]
    # Its own process group, so that stopping it also stops the workers it forks.
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
        start_new_session=True,
        env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true"},
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(work)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            status, _ = _call(conn, "GET", "/health")
            conn.close()
            if status == 200:
                return proc
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"mlflow server did not answer /health within {START_TIMEOUT:.0f}s:\n{_tail(work)}")


def _tail(work: Path) -> str:
    try:
        return (work / "mlflow-server.log").read_text()[-4000:]
    except OSError:
        return "(no server log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stored(port: int, run_id: str, key: str) -> int:
    """Points of one series MLflow hands back (the history endpoint pages at 25,000)."""
    n, token = 0, None
    while True:
        q = {"run_id": run_id, "metric_key": key, "max_results": 25000, **({"page_token": token} if token else {})}
        doc = _api(port, "GET", "/api/2.0/mlflow/metrics/get-history?" + urllib.parse.urlencode(q))
        n += len(doc.get("metrics", []))
        token = doc.get("next_page_token")
        if not token:
            return n


@dataclass
class Server:
    port: int
    version: str
    work: Path  # its temporary directory: the SQLite store, the artifacts, the server's log

    def api(self, method: str, path: str, doc=None) -> dict:
        return _api(self.port, method, path, doc)

    def log_tail(self) -> str:
        return _tail(self.work)


@contextlib.contextmanager
def tracking_server(prefix: str = "mlflow-baseline-"):
    """A fresh MLflow tracking server as a user starts it (``mlflow server``, a SQLite backend store in
    a temporary directory, loopback), the venv made first if needed; yields a ``Server``, stops the
    server and removes the directory afterwards. Raises ``Unavailable`` (the details printed) when
    MLflow cannot be installed or started."""
    version, why = make_venv()
    if version is None:
        raise Unavailable(why or "its virtual environment could not be made")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    proc = None
    try:
        port = _free_port()
        try:
            proc = _start_server(port, work)
        except RuntimeError as e:
            print(f"mlflow baseline: {e}", file=sys.stderr)
            raise Unavailable(f"mlflow server did not start ({str(e).splitlines()[0][:200]})") from e
        yield Server(port, version, work)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def run_baseline(duration_s: float = 20.0, senders: int = 2) -> dict | None:
    """MLflow's ingest rate on this machine: ``{"points_per_s", "p50_ms", "p99_ms", "mlflow_version"}``,
    or None (with the reason printed) when MLflow cannot be installed or started."""
    procs: list = []
    stack = contextlib.ExitStack()
    try:
        try:
            server = stack.enter_context(tracking_server())
        except Unavailable:
            return None
        port, work, version = server.port, server.work, server.version
        exp = _api(port, "POST", "/api/2.0/mlflow/experiments/create", {"name": f"ingest-{os.getpid()}"})
        runs = [
            _api(
                port,
                "POST",
                "/api/2.0/mlflow/runs/create",
                {
                    "experiment_id": exp["experiment_id"],
                    "start_time": int(time.time() * 1000),
                    "run_name": f"trainer-{i}",
                },
            )["run"]["info"]["run_id"]
            for i in range(senders)
        ]
        ctx = mp.get_context("fork")  # works however this module was imported
        out = ctx.Queue()
        start_at = time.time() + 3.0  # time for the children to start
        stop_at = start_at + duration_s
        procs = [ctx.Process(target=_sender, args=(port, r, start_at, stop_at, out), daemon=True) for r in runs]
        for p in procs:
            p.start()
        results = []
        for _ in procs:
            results.append(out.get(timeout=duration_s + 3.0 + REQUEST_TIMEOUT + 30))
        for p in procs:
            p.join(timeout=10)
        elapsed = max(r["ended"] for r in results) - start_at
        ok = sum(r["ok"] for r in results)
        failed = sum(r["failed"] for r in results)
        latencies = sorted(x for r in results for x in r["latencies"])
        if not ok:
            errors = {k: v for r in results for k, v in r["errors"].items()}
            print(
                f"mlflow baseline: no request was answered 200 ({failed} failed): {errors}\n{_tail(work)}",
                file=sys.stderr,
            )
            return None
        if failed:
            print(
                f"mlflow baseline: {failed} of {ok + failed} requests failed "
                f"({ {k: v for r in results for k, v in r['errors'].items()} })",
                file=sys.stderr,
            )
        # 200 must mean stored: MLflow gives back every step of a series that was answered 200
        # (a failed request may have been stored too, so it can only add).
        names = series_names()
        per_request = METRICS_PER_REQUEST // len(names)
        for r in results:  # in the order they finished, each naming its run
            run_id = r["run_id"]
            stored = _stored(port, run_id, names[-1])
            if stored < r["ok"] * per_request:
                print(
                    f"mlflow baseline: run {run_id} has {stored} points of {names[-1]!r}, "
                    f"{r['ok'] * per_request} were acknowledged",
                    file=sys.stderr,
                )
        q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
        return {
            "points_per_s": ok * per_request * len(names) / elapsed,
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": q[98] * 1e3,
            "mlflow_version": version,
        }
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        stack.close()  # stops the server, removes its directory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of sending (default 20)")
    ap.add_argument("--senders", type=int, default=2, help="concurrent sender processes (default 2)")
    args = ap.parse_args()
    load = os.getloadavg()[0]  # before the server and senders add their own
    res = run_baseline(args.duration, args.senders)
    if res is None:
        return 1
    print(
        f"# MLflow {res['mlflow_version']} tracking server (its defaults, SQLite backend store, loopback), "
        f"REST log-batch at {METRICS_PER_REQUEST} metrics per request, {args.senders} senders, {args.duration:g} s, "
        f"1-min load average before the run {load:.1f} on {os.cpu_count()} CPUs"
    )
    print()
    print("| store | points/s (durable) | p50 request (ms) | p99 request (ms) |")
    print("|---|---|---|---|")
    print(
        f"| MLflow {res['mlflow_version']}, SQLite | {res['points_per_s']:,.0f} | {res['p50_ms']:.1f} | "
        f"{res['p99_ms']:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
