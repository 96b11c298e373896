"""Shared fixtures: the real collector under uvicorn, real PostgreSQL, a real webhook receiver."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_URL = os.environ.get("OPTISCOPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def missing(why: str):
    """A real dependency is absent: skip on a developer's machine, fail in CI (CI=true)."""
    if IN_CI:
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        missing(f"{name} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, token: str | None = None, timeout: float = 10):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until(cond, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(autouse=True)
def spool_dir(tmp_path, monkeypatch):
    """Each test's runs spool into their own directory, never into the user's cache."""
    d = tmp_path / "spool"
    monkeypatch.setenv("OPTISCOPE_SPOOL_DIR", str(d))
    return d


# -- PostgreSQL --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_admin():
    try:
        import psycopg
        conn = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure means "no usable PostgreSQL"
        missing(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {e}")
    yield conn
    conn.close()


@pytest.fixture
def pg_url(pg_admin):
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"optiscope_test_{uuid.uuid4().hex[:12]}"
    pg_admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optiscope.db'}"
    return request.getfixturevalue("pg_url")


# -- webhook receiver --------------------------------------------------------------------------
class Receiver:
    def __init__(self):
        self.events: list[dict] = []
        self.headers: list[dict] = []
        self.bodies: list[bytes] = []  # as received, for signature checks
        self.attempts: list[dict] = []  # every request's headers, whatever was answered
        self.status = 200  # what the receiver answers; tests may change it
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                code = receiver.status
                receiver.attempts.append({k.lower(): v for k, v in self.headers.items()})
                if code == 200:
                    receiver.events.append(json.loads(body))
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver.bodies.append(body)
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# -- the collector -----------------------------------------------------------------------------
class Collector:
    """``optiscope serve`` in a subprocess, exactly as a user starts it."""

    def __init__(self, db: str, webhooks=(), token: str | None = None, cwd: Path | None = None, env=None,
                 extra_args=()):
        self.db, self.webhooks, self.token, self.cwd = db, list(webhooks), token, cwd
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, timeout: float = 30.0) -> "Collector":
        args = [str(BIN / "optiscope"), "serve", "--port", str(self.port), "--db", self.db, "--log-level", "warning"]
        for w in self.webhooks:
            args += ["--webhook", w]
        if self.webhooks:  # the tests' receivers listen on loopback
            args += ["--allow-internal-webhooks"]
        if self.token:
            args += ["--token", self.token]
        args += self.extra_args
        self.log = open(Path(self.cwd or ".") / f"collector-{self.port}.log", "w") if self.cwd else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env)

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"collector exited with {self.proc.returncode}: {self.read_log()}")
            try:
                return get_json(self.url + "/healthz", timeout=1)["status"] == "ok"
            except OSError:
                return False

        wait_until(healthy, timeout, what="collector /healthz")
        return self

    def read_log(self) -> str:
        if self.cwd:
            return (Path(self.cwd) / f"collector-{self.port}.log").read_text()[-4000:]
        return ""

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log not in (None, subprocess.DEVNULL):
            self.log.close()

    def api(self, path: str):
        return get_json(self.url + "/api/v1" + path, self.token)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()


@pytest.fixture
def collector(db_url, receiver, tmp_path):
    c = Collector(db_url, webhooks=[receiver.url], cwd=tmp_path).start()
    yield c
    c.stop()


@pytest.fixture
def sqlite_collector(receiver, tmp_path):
    c = Collector(f"sqlite:///{tmp_path / 'optiscope.db'}", webhooks=[receiver.url], cwd=tmp_path).start()
    yield c
    c.stop()
