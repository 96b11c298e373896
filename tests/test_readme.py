"""The README is the front door: its catalog matches the one definition in the wire module, and the
commands it names exist."""

from __future__ import annotations

import re

from optiscope.wire import CATALOG

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_metric_catalog_matches_wire_module():
    rows = {}
    for line in README.splitlines():
        m = re.match(r"\| `([^`]+)` \| ((?:[^|]|\\\|)+) \| ((?:[^|]|\\\|)+) \| ((?:[^|]|\\\|)+) \| ([^|]+) \|$", line)
        if m and not m.group(1).startswith("optiscope_"):  # the Prometheus table lists optiscope_*
            rows[m.group(1)] = tuple(x.replace("\\|", "|").strip() for x in m.groups()[1:])
    assert set(rows) == set(CATALOG)
    for name, spec in CATALOG.items():
        assert rows[name] == (spec.scope, spec.formula, spec.unit, spec.when), name


def test_readme_commands_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("install", "demo", "test"):
        assert f"make {target}" in README and re.search(rf"^{target}:", makefile, re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("make test")
