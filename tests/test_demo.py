"""The README's front door: `make demo` runs exactly as a newcomer runs it, and shows a run and an alert."""

from __future__ import annotations

import subprocess

from conftest import ROOT, need_tool


def test_make_demo():
    make = need_tool("make")
    r = subprocess.run([make, "-s", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "/api/v1/runs/" in out
    assert "non_finite firing" in out and "webhook received alert.firing" in out
    assert "optiscope_run_loss{" in out
