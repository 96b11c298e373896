"""Schema fuzzing: schemathesis against the live OpenAPI schema of the real collector.

The collector runs as ``optiscope serve`` (uvicorn) on SQLite and on PostgreSQL. The schemathesis
CLI loads its ``/openapi.json`` and sends generated requests to every operation: valid ones
(positive) and ones that break the schema (negative), from its coverage phase (boundary values of
every constraint, unexpected methods) and its fuzzing phase. The only check is
``not_a_server_error``: whatever the input, the answer is a 2xx, 3xx or 4xx, never a 5xx, and the
collector stays up.

So that the operations reach real rows, the collector is seeded first (runs with series on two
ranks, non-finite values, an alert, a finished run) and the test's copy of the schema lets every
parameter of a seeded kind also take the seeded values: ``run_id``, ``run``, ``project``, the
series ``name``, ``alert_id`` and the runs list's ``cursor`` become ``anyOf: [{enum: seeded}, <served schema>]``.
DELETE operations get disposable runs and a project of their own, so that the runs the other
operations read stay in place. Nothing else of the served schema is changed.

Ingest (``POST /api/v1/runs/{run_id}/batches``) takes a raw wire batch: binary version 2
(``application/vnd.optiscope.batch``) or a version 1 JSON document, told apart by the first bytes.
The ingest operation declares its body (binary version 2, or the version 1 JSON schema). Bodies of the binary media type come from ``ingest_body()``
below: real batches of both versions, valid and then damaged (header fields at their limits,
bytes overwritten, cut or appended, JSON fields swapped for any JSON value), so the decoder and
the store are fuzzed past the first byte. A second test posts such bodies on its own, each to its
own run, so that they reach the store, and checks that some are stored.

Bounded for CI (about 15-20 s per database on a developer machine): a fixed number of examples per
operation and mode, derandomized (the same requests on every run), no example database, no
shrinking. OPTISCOPE_FUZZ_EXAMPLES=300 digs deeper locally.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import math
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st

from optiscope import wire

from conftest import Collector

MAX_EXAMPLES = int(os.environ.get("OPTISCOPE_FUZZ_EXAMPLES", "30"))  # per operation and mode
INGEST_EXAMPLES = 6 * MAX_EXAMPLES  # bodies posted by test_ingest_never_answers_5xx_to_damaged_batches
SEED = 20240601  # of those bodies

PROJECT = "fuzz"
RUNS = ["fuzz-run", "fuzz-run-2"]  # read by every operation but DELETE
INGEST_RUN = "fuzz-ingest"  # the run generated batches are posted to
DOOMED_PROJECT = "fuzz-doomed"
DOOMED_RUNS = ["fuzz-doomed-1", "fuzz-doomed-2", "fuzz-doomed-3"]  # for DELETE to delete
SERIES = ["loss", "lr", "grad_norm", "grad_norm/param/0.weight", "extreme"]

# Bounds as the database stores them: rank in an INTEGER (32-bit on PostgreSQL), seq and steps in
# a BIGINT (signed 64-bit).
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


# -- ingest bodies: real batches of both wire versions, valid and then damaged ------------------
# Plain seeded random generators, so that each case below has a known share of the bodies
# (Hypothesis' own choices starve rare branches at a few hundred examples).
_EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
_NAMES = SERIES + ["x", "a" * wire.MAX_NAME_LEN, "b:c/d.e-f_g"]
_FLOATS = [0.0, -0.0, 1.5, -2.5e-300, 5e-324, 1.7976931348623157e308, math.nan, math.inf, -math.inf]
_WIDTH = {"B": 2**8 - 1, "H": 2**16 - 1, "I": 2**32 - 1, "Q": 2**64 - 1}


def _int(rng: random.Random, hi: int) -> int:
    """Half small, a third a storage boundary (2**31, 2**63, ...) up to hi, else anything up to hi."""
    k = rng.random()
    if k < 0.5:
        return rng.randint(0, 60)
    if k < 0.85:
        return rng.choice([e for e in _EDGES if e <= hi])
    return rng.randint(0, hi)


def _float(rng: random.Random) -> float:
    return rng.choice(_FLOATS) if rng.random() < 0.3 else rng.uniform(-1e6, 1e6)


def _any_json(rng: random.Random, depth: int = 0):
    """Any JSON value: huge integers, odd floats, strings with NUL or the non-finite spellings, nesting."""
    k = rng.randrange(7 if depth < 2 else 5)
    if k == 0:
        return rng.choice([None, True, False, -1, -(2**63) - 1, 10**400] + _EDGES)
    if k == 1:
        return rng.choice([_float(rng), 1e308, -1e308])
    if k == 2:
        return rng.choice(["", "x", "\x00", "NaN", "Infinity", "-Infinity", "1", "a" * 300, "\u00e9\u2028"])
    if k == 3:
        return rng.randint(-5, 5)
    if k == 4:
        return rng.uniform(0, 2e9)
    if k == 5:
        return [_any_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["", "k", "\x00", "v", "run"]): _any_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _batch(rng: random.Random, rank_hi: int, seq_hi: int, step_hi: int) -> wire.Batch:
    run = rng.choice([INGEST_RUN] * 8 + [RUNS[0], "no-such-run"])
    rank = rng.randint(0, 3) if rng.random() < 0.6 else _int(rng, rank_hi)
    seq = rng.randint(100, 10**9) if rng.random() < 0.5 else _int(rng, seq_hi)  # mostly not yet stored
    records = [
        (
            _int(rng, step_hi),
            rng.uniform(1.6e9, 1.8e9),
            {name: _float(rng) for name in rng.sample(_NAMES, rng.randint(0, 4))},
        )
        for _ in range(rng.randint(0, 6))
    ]
    return wire.Batch(run, rank, seq, records)


def binary_batch(rng: random.Random) -> tuple[str, bytes]:
    """(run, a version 2 body) as the SDK encodes it; in half of them one kind of damage: a header
    field set to a value of its width, bytes overwritten, the end cut off, or bytes appended."""
    batch = _batch(rng, _WIDTH["I"], _WIDTH["Q"], INT64_MAX)
    body = bytearray(wire.encode_batch(batch, version=2))
    how = rng.choice(["none"] * 4 + ["header", "overwrite", "truncate", "append"])
    if how == "header":
        # magic 4s | version B | flags B | run id length H | rank I | seq Q | records I | series I
        off, fmt = rng.choice([(4, "B"), (5, "B"), (6, "H"), (8, "I"), (12, "Q"), (20, "I"), (24, "I")])
        struct.pack_into("<" + fmt, body, off, _int(rng, _WIDTH[fmt]))
    elif how == "overwrite":
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
    elif how == "truncate":
        del body[rng.randrange(len(body)) :]
    elif how == "append":
        body += rng.randbytes(rng.randint(1, 16))
    return batch.run, bytes(body)


def json_batch(rng: random.Random) -> tuple[str, bytes]:
    """(run, a version 1 body); in half of them one field or record part swapped for any JSON value,
    deep nesting, or the text cut off. JSON integers have no width: ids and steps go past 64 bits."""
    batch = _batch(rng, 2**70, 2**70, 2**70)
    doc = {
        "v": 1,
        "run": batch.run,
        "rank": batch.rank,
        "seq": batch.seq,
        "records": [[s, t, {k: wire.encode_value(v) for k, v in vals.items()}] for s, t, vals in batch.records],
    }
    how = rng.choice(["none"] * 4 + ["field", "record", "nesting", "truncate"])
    if how == "field":
        doc[rng.choice(["v", "run", "rank", "seq", "records", "extra"])] = _any_json(rng)
    elif how == "record" and doc["records"]:
        rec = rng.choice(doc["records"])
        i = rng.randrange(4)
        if i == 3:
            rec[2][rng.choice(_NAMES)] = _any_json(rng)
        else:
            rec[i] = _any_json(rng)
    text = json.dumps(doc)
    if how == "nesting":
        depth = rng.choice([10, 1_000, 5_000])  # past the JSON decoder's recursion limit
        text = text[:-1] + ', "records": ' + "[" * depth + "]" * depth + "}"
    elif how == "truncate":
        text = text[: rng.randrange(len(text))]
    return batch.run, text.encode()


def ingest_body(rng: random.Random) -> tuple[str, bytes]:
    """(the batch's run id, a request body of either wire version)."""
    return binary_batch(rng) if rng.random() < 0.5 else json_batch(rng)


# schemathesis draws the bodies of this media type from here (the run id in the path is its own).
schemathesis.openapi.media_type(
    wire.CONTENT_TYPE, st.integers(0, 2**32).map(lambda seed: ingest_body(random.Random(seed))[1])
)


# -- the live collector, seeded -----------------------------------------------------------------
def _post_batch(c: Collector, run: str, rank: int, seq: int, records) -> None:
    r = httpx.post(
        f"{c.url}/api/v1/runs/{run}/batches",
        content=wire.encode_batch(wire.Batch(run, rank, seq, records)),
        headers={"Content-Type": wire.CONTENT_TYPE},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def _register(c: Collector, run: str, project: str, rank: int = 0, **extra) -> None:
    r = httpx.put(
        f"{c.url}/api/v1/runs/{run}", json={"project": project, "name": run, "rank": rank, **extra}, timeout=30
    )
    assert r.status_code == 200, r.text


def seed(c: Collector) -> dict[str, list]:
    """Runs, series, alerts. Returns the seeds only known once stored: the alerts' ids, and
    runs-list cursors (real ones and near-misses of them)."""
    for i, run in enumerate(RUNS + [INGEST_RUN]):
        _register(c, run, PROJECT, config={"lr": 0.1 * (i + 1), "opt": "adamw", "layers": [1, 2], "on": True})
        _register(c, run, PROJECT, rank=1)
        for rank in (0, 1):
            records = [
                (
                    s,
                    1_700_000_000.0 + s,
                    {"loss": 1.0 / (s + 1), "lr": 0.1, "grad_norm": float(s), "grad_norm/param/0.weight": 0.5},
                )
                for s in range(50)
            ]
            _post_batch(c, run, rank, 0, records)
        # non-finite values: stored as data, and a NaN loss fires an alert
        _post_batch(
            c,
            run,
            0,
            1,
            [
                (50, 1_700_000_050.0, {"loss": math.nan, "extreme": math.inf}),
                (51, 1_700_000_051.0, {"extreme": -math.inf}),
            ],
        )
    r = httpx.post(f"{c.url}/api/v1/runs/{RUNS[1]}/finish", json={"status": "finished", "rank": 0}, timeout=30)
    assert r.status_code == 200, r.text
    for i, run in enumerate(DOOMED_RUNS):
        _register(c, run, DOOMED_PROJECT)
        _post_batch(c, run, 0, 0, [(0, 1_700_000_000.0, {"loss": math.nan})])
        if i:
            httpx.post(f"{c.url}/api/v1/runs/{run}/finish", json={"status": "crashed"}, timeout=30)
    alerts = httpx.get(f"{c.url}/api/v1/alerts", timeout=30)
    alert_ids = [a["id"] for a in alerts.json().get("alerts", [])] if alerts.status_code == 200 else []
    # The runs list's cursor is opaque: random strings never get past its decoding. Seed the real
    # cursors of the default listing and of a sort by name, and copies with the sort value or the
    # run id swapped for values of other types and sizes.
    cursors = []
    for params in ({"limit": 1}, {"limit": 1, "sort": "name", "order": "asc"}):
        r = httpx.get(f"{c.url}/api/v1/runs", params=params, timeout=30)
        if r.status_code == 200 and r.json().get("next_cursor"):
            cursors.append(r.json()["next_cursor"])
    for cursor in list(cursors):
        try:
            parts = json.loads(base64.urlsafe_b64decode(cursor))
        except ValueError:
            continue
        if not isinstance(parts, list) or len(parts) < 2:
            continue
        for i in range(2, len(parts)):
            for odd in (2**63, 10**30, -1, 1e308, True, None, "", "x\x00y", [], {}):
                variant = list(parts)
                variant[i] = odd
                cursors.append(base64.urlsafe_b64encode(json.dumps(variant).encode()).decode())
    return {"cursor": cursors, "alert_id": alert_ids}


def _with_seeds(schema: dict, values: list) -> dict:
    """The schema, also allowing the seeded values (for an array: as items)."""
    if not values:
        return schema
    if schema.get("type") == "array" and "items" in schema:
        return {**schema, "items": {"anyOf": [{"enum": values}, schema["items"]]}}
    return {"anyOf": [{"enum": values}, schema]}


def seeded_schema(doc: dict, stored: dict[str, list]) -> dict:
    """A copy of the served schema whose parameters also allow the seeded ids, names and cursors,
    and whose ingest operation declares its body if the served schema does not."""
    doc = copy.deepcopy(doc)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict):
                continue
            deleting = method.lower() == "delete"
            ingest = method.lower() == "post" and path.endswith("/batches")
            seeds = {
                "run_id": DOOMED_RUNS if deleting else ([INGEST_RUN] if ingest else RUNS),
                "project": [DOOMED_PROJECT] if deleting else [PROJECT],
                "run": RUNS + [INGEST_RUN],
                "name": SERIES,
                **stored,
            }
            for param in op.get("parameters", []):
                if param.get("name") in seeds and "schema" in param:
                    param["schema"] = _with_seeds(param["schema"], seeds[param["name"]])
            if ingest:
                assert "requestBody" in op, "the ingest operation must declare its body"
                body = op["requestBody"].get("content", {}).get("application/json", {}).get("schema", {})
                if "run" in body.get("properties", {}):  # the batch's own run id: the path's, mostly
                    body["properties"]["run"] = _with_seeds(body["properties"]["run"], [INGEST_RUN])
    return doc


def config_toml() -> str:
    """schemathesis.toml for the run: bounded, reproducible, the ingest operation dug deeper."""
    return f"""
[generation]
mode = "all"
max-examples = {MAX_EXAMPLES}
deterministic = true
no-shrink = true

[phases.examples]
enabled = false

[phases.stateful]
enabled = false

[[operations]]
include-method = "POST"
include-path-regex = "/batches$"
generation.max-examples = {2 * MAX_EXAMPLES}
"""


@pytest.fixture
def fuzz_collector(db_url, tmp_path):
    c = Collector(db_url, cwd=tmp_path).start()
    try:
        yield c, seed(c)
    finally:
        c.stop()


def test_no_server_error_on_any_generated_request(fuzz_collector, tmp_path):
    c, stored = fuzz_collector
    doc = httpx.get(f"{c.url}/openapi.json", timeout=30).json()
    schema_path = tmp_path / "openapi.json"
    schema_path.write_text(json.dumps(seeded_schema(doc, stored)))
    config_path = tmp_path / "schemathesis.toml"
    config_path.write_text(config_toml())
    # The schemathesis CLI, as one would run it by hand. This module is its hooks file: importing
    # it registers ingest_body() for application/vnd.optiscope.batch.
    here = Path(__file__).resolve()
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(here),
        "NO_COLOR": "1",
        "COLUMNS": "120",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(here.parent), os.environ.get("PYTHONPATH")])),
    }
    args = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config_path),
        "run",
        str(schema_path),
        "--url",
        c.url,
        "--checks",
        "not_a_server_error",
        "--phases",
        "coverage,fuzzing",
        "--continue-on-failure",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    alive = c.proc.poll() is None
    if r.returncode != 0 or not alive:
        pytest.fail(
            f"schemathesis exited with {r.returncode}; collector {'up' if alive else 'DOWN'}\n"
            f"{r.stdout[-30000:]}\n{r.stderr[-4000:]}\n--- collector log (end) ---\n{c.read_log()}",
            pytrace=False,
        )


def test_ingest_never_answers_5xx_to_damaged_batches(fuzz_collector):
    """The ingest operation on its own, INGEST_EXAMPLES bodies: each posted to its own run's URL (1 in
    5 to another run's), 1 in 5 gzip-compressed. Every answer is below 500, and some batches are
    stored: the bodies are real batches, not only noise."""
    c, _ = fuzz_collector
    outcomes: Counter = Counter()
    crashes: list[str] = []
    # No keep-alive: a connection the collector closes after a crash must not fail the next request.
    with httpx.Client(base_url=c.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(INGEST_EXAMPLES):
            rng = random.Random(SEED + i)
            run, body = ingest_body(rng)
            path = f"/api/v1/runs/{run if rng.random() < 0.8 else RUNS[1]}/batches"
            headers = {"Content-Type": wire.CONTENT_TYPE}
            gzipped = rng.random() < 0.2
            if gzipped:
                headers["Content-Encoding"] = "gzip"
            r = client.post(path, content=gzip.compress(body) if gzipped else body, headers=headers)
            try:
                doc = r.json()
            except ValueError:
                doc = None
            doc = doc if isinstance(doc, dict) else {}
            outcomes[(r.status_code, doc.get("reason") or ("duplicate" if doc.get("duplicate") else ""))] += 1
            if r.status_code >= 500:
                crashes.append(
                    f"case {i}: {r.status_code} for POST {path}{' (gzip-compressed)' if gzipped else ''}, "
                    f"{len(body)} bytes: {body[:300]!r}"
                )
    if crashes:
        pytest.fail(
            f"{len(crashes)} of {INGEST_EXAMPLES} ingest requests got a server error:\n"
            + "\n".join(crashes[:30])
            + f"\n--- collector log (end) ---\n{c.read_log()}",
            pytrace=False,
        )
    # The bodies were sensible: batches were stored, not only rejected, and the rejections varied.
    assert outcomes[(200, "")] >= INGEST_EXAMPLES // 20, outcomes
    assert len({reason for (status, reason) in outcomes if status >= 400}) >= 8, outcomes
