"""Shared fixtures: the real collector under uvicorn, real PostgreSQL, a real webhook receiver."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from http_receiver import HttpReceiver, Request

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


# -- markers: what `make test-fast` leaves out (pytest.ini describes each one) ------------------------
#: Whole modules, by path under tests/. Everything in them is of that kind, whatever fixtures it uses.
MODULE_MARKERS = {
    "test_bench_smoke.py": "bench",  # each bench/ script with --smoke, in a subprocess
    "test_schema_fuzz.py": "fuzz",  # schemathesis and hypothesis against the collector's API
    "test_e2e.py": "e2e",  # a training run through the real collector to a webhook
    "test_detection_e2e.py": "e2e",  # diverging training runs through the real collector
    "test_demo.py": "e2e",  # `make demo`: a training run and the collector, as the README shows
    "faults/test_collector_restarts.py": "e2e",  # kills and restarts the real collector under a run
}
#: Fixtures that start a real service in a subprocess: the collector (`optiscope serve`), Prometheus,
#: Alertmanager. A test that uses one of them, directly or through another fixture, is e2e.
SERVICE_FIXTURES = frozenset({"collector", "sqlite_collector", "prometheus", "alertmanager"})


def _functions_starting_the_collector(path: Path) -> frozenset[str]:
    """The names of the functions (tests, fixtures, helpers) in the module at ``path`` that start the
    real collector themselves: they call ``Collector(...)`` or build an argv with ``"serve"`` in it
    (``optiscope serve`` run by hand), or call a function of the module that does."""
    tree = ast.parse(path.read_text(), str(path))
    calls: dict[str, set[str]] = {}
    starts: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        called = calls.setdefault(node.name, set())
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
                called.add(sub.func.id)
            elif isinstance(sub, ast.List | ast.Tuple) and any(
                isinstance(e, ast.Constant) and e.value == "serve" for e in sub.elts
            ):
                starts.add(node.name)
        if "Collector" in called:
            starts.add(node.name)
    changed = True
    while changed:  # through the module's own helpers
        grown = {name for name, called in calls.items() if called & starts}
        changed = not grown <= starts
        starts |= grown
    return frozenset(starts)


def pytest_collection_modifyitems(config, items):
    """Mark each test ``e2e``, ``bench`` or ``fuzz`` (see pytest.ini) so that ``-m "not e2e and not
    bench and not fuzz"`` is the fast loop. A test is e2e when its module is listed as such in
    MODULE_MARKERS, when it uses a SERVICE_FIXTURES fixture, or when it or a fixture of its module
    starts the collector itself (see _functions_starting_the_collector). Tests on PostgreSQL
    (the ``postgresql`` case of ``db_url``, ``pg_url``) stay in the fast loop: a database is cheap."""
    tests_dir = Path(__file__).resolve().parent
    starters: dict[Path, frozenset[str]] = {}
    for item in items:
        path = Path(item.path)
        kind = MODULE_MARKERS.get(path.relative_to(tests_dir).as_posix()) if path.is_relative_to(tests_dir) else None
        if kind is None:
            if path not in starters:
                starters[path] = _functions_starting_the_collector(path)
            names = set(item.fixturenames) | {getattr(item, "originalname", item.name)}
            if names & SERVICE_FIXTURES or names & starters[path]:
                kind = "e2e"
        if kind is not None:
            item.add_marker(kind)


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


# -- local HTTP endpoints -----------------------------------------------------------------------
@pytest.fixture
def http_receiver():
    """A factory of :class:`HttpReceiver` (tests/http_receiver.py): ``http_receiver(status=204)``.
    Every one made is closed after the test, and the test fails if one of their handlers raised."""
    made: list[HttpReceiver] = []

    def make(*args, **kwargs) -> HttpReceiver:
        made.append(HttpReceiver(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()
    errors = [e for r in made for e in r.errors]
    assert not errors, f"an HttpReceiver handler raised: {errors!r}"


class Receiver:
    """A webhook endpoint at ``url`` (path /hook) on an :class:`HttpReceiver`. It answers every
    request ``status`` (200 unless a test changes it; anything but POST is answered 405).

    ``attempts``: every request's headers, whatever was answered. ``events`` (decoded JSON),
    ``headers`` and ``bodies`` (as received, for signature checks): the POSTs answered 200, in order.
    """

    def __init__(self):
        self.status = 200
        self.events: list = []
        self.headers: list[dict] = []
        self.bodies: list[bytes] = []
        self.http = HttpReceiver(handler=self._answer)
        self.url = self.http.url + "/hook"

    @property
    def attempts(self) -> list[dict]:
        return [r.headers for r in self.http.requests]

    @property
    def errors(self) -> list[BaseException]:
        return self.http.errors

    def _answer(self, request: Request):
        if request.method != "POST":
            return 405, {}, b""
        code = self.status
        if code == 200:
            self.events.append(request.json())
            self.headers.append(request.headers)
            self.bodies.append(request.body)
        return code, {}, b""

    def close(self):
        self.http.close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()
    assert not r.errors, f"the webhook receiver could not take a request: {r.errors!r}"


# -- the collector -----------------------------------------------------------------------------
class Collector:
    """``optiscope serve`` in a subprocess, exactly as a user starts it."""

    def __init__(
        self, db: str, webhooks=(), token: str | None = None, cwd: Path | None = None, env=None, extra_args=()
    ):
        self.db, self.webhooks, self.token, self.cwd = db, list(webhooks), token, cwd
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, timeout: float = 30.0) -> Collector:
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
