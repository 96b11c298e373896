"""A smoke-sized run of each benchmark, so none of them can rot (the full runs stay out of CI)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_overhead_benchmark_smoke():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    for row in (
        "| bare |",
        "| attached, step not sampled (paired) |",
        "| attached, step not sampled (hooks timed directly) |",
        "| defaults (every=",
        "| full statistics, every step (native walks) |",
        "| full statistics, every step (torch.compile kernels) |",
        "| full statistics, every step (eager blocks) |",
        "| naive .norm().item() loop |",
        "| floor: one copy",
    ):
        assert row in r.stdout, row
    assert "targets:" in r.stdout
    # a machine without a C compiler would say so
    assert "native walks: built" in r.stdout and "fused kernels: compiled" in r.stdout


def test_absent_collector_benchmark_smoke():
    """A run trains while nothing listens at its URL; the collector then starts and the script
    checks through the REST API that every point arrived once (exit 1 if not). Timing is printed,
    never asserted."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "absent.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for row in (
        "| step time, median (ms) |",
        "| RSS growth after step",
        "| SDK counters at end of training |",
        "| delivered after the collector started |",
    ):
        assert row in r.stdout, row
    assert "delivery: every point arrived exactly once" in r.stdout, r.stdout
    assert "sent_points 0 |" in r.stdout, r.stdout  # nothing was delivered while the collector was absent


def test_ingest_benchmark_smoke(pg_admin):
    """Both stores, through the real collector; the script exits 1 unless the store holds exactly the
    acknowledged points and a series reads back complete."""
    from conftest import PG_ADMIN_URL

    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--smoke", "--pg", PG_ADMIN_URL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| store | points/s (median of rounds) |" in r.stdout
    for store in ("SQLite", "PostgreSQL"):
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {store} |"))
        assert "unavailable" not in row, row
        assert f"targets: {store} >=" in r.stdout
        assert "one series read back complete: True" in r.stdout


def test_query_benchmark_smoke(pg_admin):
    """Both stores: the script checks each answer (downsampled, the largest spike and a NaN kept,
    the filter respected) and fails on a wrong one; the table must come out complete."""
    from conftest import PG_ADMIN_URL

    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "query.py"), "--smoke", "--pg", PG_ADMIN_URL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| store | series p50 (ms) | series p95 (ms) | runs p50 (ms) |" in r.stdout
    for store in ("SQLite", "PostgreSQL"):
        assert any(line.startswith(f"| {store} |") for line in r.stdout.splitlines()), store
        assert f"{store}: series p50" in r.stdout


def test_alerts_benchmark_smoke(pg_admin):
    """Both stores, through the real collector and a webhook receiver in the script: it exits 1 unless
    every alert (firing and resolved) arrived and every delivery's signature verified. Latency is
    printed, never asserted."""
    from conftest import PG_ADMIN_URL

    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "alerts.py"), "--smoke", "--pg", PG_ADMIN_URL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| store | condition | N | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | ingest p50 (ms) |" in r.stdout
    for store in ("SQLite", "PostgreSQL"):
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {store} |"))
        assert row.startswith(f"| {store} | idle | 10 |"), row
        summary = next(line for line in r.stdout.splitlines() if line.startswith(f"{store}: "))
        assert " 0 failed the signature check" in summary and "idle: 0 missing" in summary, summary
    assert "delivery: every alert arrived, signed correctly" in r.stdout, r.stdout


def test_detection_benchmark_smoke():
    """Two scenarios of the kit, one seed, the SDK attached as a user attaches it: the table comes out
    whole, no record is lost, the diverging run is caught before it fails and the healthy one never pages."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "detection.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| detector | recall |" in r.stdout and "| nan_or_10x_min (kit) |" in r.stdout
    assert "records lost by the SDK: none" in r.stdout
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in r.stdout.splitlines()
        if line.startswith("| mlp_")
    }
    assert int(rows["mlp_lr_ramp"]) >= 1, rows  # a lead of at least one step: paged before the failure
    assert rows["mlp_corrupt_batch_recovers"] == "0", rows  # no alarm event on the benign run


def test_vitals_benchmark_smoke():
    """The per-step vitals on a tiny model: the table comes out whole and the per-step gradient norm
    equals the float64 norm before clipping (the script exits 1 otherwise; on CUDA it also exits 1
    on a host-device sync)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vitals.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ("| bare |", "| vitals off |", "| vitals on |"):
        assert row in r.stdout, row
    assert "per-step grad_norm equals the float64 pre-clip norm: yes" in r.stdout
