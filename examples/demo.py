"""`make demo`: a real training run goes wrong and optiscope shows it.

Starts the collector on SQLite on loopback, trains a small MLP on CPU with the SDK attached, and
lets a learning-rate schedule bug (a warmup factor that keeps compounding after step 100) drive
the loss to a non-finite value. Then prints what a user looks at: the run in the REST API, the
alert that fired and was delivered to a webhook, and a few lines of /metrics. Stops everything it
started; exits non-zero if the alert did not arrive.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import optiscope

STEPS = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def start_webhook_receiver():
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def start_collector(workdir: Path, webhook: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "optiscope"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--port",
            str(port),
            "--db",
            f"sqlite:///{workdir / 'optiscope.db'}",
            "--webhook",
            webhook,
            "--allow-internal-webhooks",
            "--log-level",
            "warning",
        ],
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if get(url + "/healthz")["status"] == "ok":
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the collector did not start")


def train(run: optiscope.Run) -> int:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 1, generator=g)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # The bug: the warmup factor was meant to stop at 1.0; after step 100 it compounds by 12% a step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 100 else 1.12 ** (s - 100))
    run.watch(opt, model)
    for step in range(STEPS):
        x = torch.randn(64, 16, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))
        if not math.isfinite(loss.item()):  # the demo's own stop condition (a host sync, on purpose)
            run.log({"loss": loss}, step=step)
            return step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run.log({"loss": loss}, step=step)
    return STEPS


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="optiscope-demo-") as tmp:
        hook_server, received = start_webhook_receiver()
        hook_url = f"http://127.0.0.1:{hook_server.server_address[1]}/hook"
        collector, url = start_collector(Path(tmp), hook_url)
        try:
            print(f"collector  {url}  (SQLite in a temporary directory; webhook receiver {hook_url})")
            run = optiscope.init(
                project="demo",
                name="mlp-lr-schedule-bug",
                url=url,
                config={"optimizer": "AdamW", "lr_peak": 1e-3, "schedule": "warmup then constant"},
            )
            t0 = time.monotonic()
            last = train(run)
            delivered = run.finish(timeout=30)
            print(
                f"training   stopped at step {last} after {time.monotonic() - t0:.1f}s; "
                f"{run.counters['sent_points']} points delivered (complete: {delivered})"
            )

            detail = get(run.api_url)
            print(f"\nthe run    {run.api_url}")
            print(f"           status {detail['status']}, alerts {detail['alerts']}")
            for name in ("loss", "lr", "grad_norm", "update_ratio"):
                point = detail["last"].get(name)
                if point:
                    print(f"           last {name:<13} {point['value']!s:<24} at step {point['step']}")
            loss = get(run.api_url + "/series/loss")
            print(f"           {run.api_url}/series/loss -> {len(loss['steps'])} points, last {loss['values'][-3:]}")

            deadline = time.monotonic() + 15
            while not received and time.monotonic() < deadline:
                time.sleep(0.1)
            alerts = get(run.api_url + "/alerts")["alerts"]
            print(f"\nthe alert  {url}/api/v1/alerts")
            for a in alerts:
                print(f"           [{a['severity']}] {a['rule']} {a['state']}: {a['message']}")
            for event in received:
                print(
                    f"           webhook received {event['type']}: {event['alert']['message']} -> {event['run']['url']}"
                )

            print(f"\n/metrics   {url}/metrics")
            for line in get(url + "/metrics").splitlines():
                if line.startswith(
                    (
                        "optiscope_run_loss{",
                        "optiscope_run_lr{",
                        "optiscope_run_grad_norm{",
                        "optiscope_run_alerts_firing{",
                        "optiscope_alerts_fired_total",
                    )
                ):
                    print(f"           {line}")
            if not (alerts and received):
                print("\ndemo FAILED: no alert was delivered", file=sys.stderr)
                return 1
            return 0
        finally:
            collector.terminate()
            collector.wait(15)
            hook_server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
