"""A smoke-sized run of each benchmark, so none of them can rot (the full runs stay out of CI)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_overhead_benchmark_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--smoke"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for row in ("| bare |", "| attached, step not sampled (paired) |", "| attached, step not sampled (hooks timed directly) |",
                "| defaults (every=", "| full statistics, every step |",
                "| naive .norm().item() loop |", "| floor: one copy"):
        assert row in r.stdout, row
    assert "targets:" in r.stdout
