"""The shape of the code, checked: small functions and classes, one version, one direction of
imports. These are the limits CONTRIBUTING.md states; a change that breaks one splits the code
instead of raising the limit."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import optiscope
import optiscope_server

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "sdk" / "src" / "optiscope", ROOT / "service" / "src" / "optiscope_server"]
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 250


def _modules():
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            if "migrations" not in path.parts:  # frozen schema history: written once, never edited
                yield path


def _spans(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1  # the def/class line through its last line


def test_no_function_over_60_lines_and_no_class_over_250():
    too_long = []
    for path in _modules():
        for node, lines in _spans(ast.parse(path.read_text(), str(path))):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines > {limit})")
    assert not too_long, "\n".join(too_long)


def test_the_limits_are_enforced_on_something():
    """The walk sees the code (a test over nothing would pass for ever)."""
    found = {node.name for path in _modules() for node, _ in _spans(ast.parse(path.read_text()))}
    assert {"Ingestor", "create_app", "init", "DetectorRunner"} <= found


def test_the_sdk_never_imports_the_collector():
    """import-linter checks this too (make lint); here it is also a plain test, on the source text."""
    offenders = []
    for path in (ROOT / "sdk" / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "optiscope_server"]
    assert not offenders, offenders


def test_one_version_for_both_packages():
    """Each package declares its version once; the two are released together."""
    assert optiscope.__version__ == importlib.metadata.version("optiscope")
    assert optiscope_server.__version__ == importlib.metadata.version("optiscope-server") == optiscope.__version__


def test_the_collector_commands_come_from_entry_points():
    """``optiscope serve|db|token`` are found through the entry point group, not by importing the
    collector from the SDK."""
    from optiscope.cli import COLLECTOR_COMMANDS, plugin_commands

    found = plugin_commands()
    assert set(COLLECTOR_COMMANDS) <= set(found)
    assert found["serve"].value == "optiscope_server.cli:serve"
