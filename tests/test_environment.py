"""The environment fingerprint: real git checkouts, a missing or hanging git, torch's flags as the
script set them, and no part able to raise or to import torch."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from optiscope.probe import environment
from optiscope.probe.environment import devices_pending, fingerprint

from fake_collector import FakeCollector

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


@pytest.fixture
def outside_git(tmp_path, monkeypatch):
    """A working directory git cannot walk up from into an enclosing checkout."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    return tmp_path


def make_repo(path):
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "trunk", str(path)], check=True)
    (path / "train.py").write_text("print('hi')\n")
    subprocess.run([*GIT, "-C", str(path), "add", "train.py"], check=True)
    subprocess.run([*GIT, "-C", str(path), "commit", "-q", "-m", "one"], check=True)
    return subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_git_commit_branch_and_dirty(outside_git, monkeypatch):
    repo = outside_git / "repo"
    commit = make_repo(repo)
    monkeypatch.chdir(repo)
    assert fingerprint()["git"] == {"commit": commit, "branch": "trunk", "dirty": False}
    (repo / "notes.txt").write_text("untracked files do not make a checkout dirty\n")
    assert fingerprint()["git"]["dirty"] is False
    (repo / "train.py").write_text("print('changed')\n")
    assert fingerprint()["git"] == {"commit": commit, "branch": "trunk", "dirty": True}
    subprocess.run(["git", "checkout", "-q", "--detach"], check=True)
    assert fingerprint()["git"]["branch"] is None  # detached HEAD: no branch, not "HEAD"


def test_git_outside_a_checkout_is_none(outside_git, monkeypatch):
    monkeypatch.chdir(outside_git)
    assert fingerprint()["git"] is None


def test_git_missing_from_path_is_none(outside_git, monkeypatch, capfd):
    repo = outside_git / "repo"
    make_repo(repo)
    monkeypatch.chdir(repo)
    capfd.readouterr()
    monkeypatch.setenv("PATH", str(outside_git / "empty"))
    assert environment._git() is None  # itself, not only through the guard every part has
    env = fingerprint()
    assert env["git"] is None and env["python"]  # the rest is still there
    assert capfd.readouterr() == ("", "")  # nothing reaches the user's terminal


def test_a_hanging_git_costs_the_budget_only(outside_git, monkeypatch, capfd):
    bin_dir = outside_git / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\necho 'git: thinking' >&2\nsleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(environment, "GIT_BUDGET", 0.5)
    monkeypatch.chdir(outside_git)
    capfd.readouterr()
    t0 = time.monotonic()
    env = fingerprint()
    assert env["git"] is None
    assert time.monotonic() - t0 < 5  # one budget, not one per command, and never 30 s
    assert capfd.readouterr().err == ""


def test_torch_versions_and_determinism_flags_are_read():
    env = fingerprint()
    assert env["torch"] == torch.__version__ == env["packages"]["torch"]
    assert env["cuda"] == torch.version.cuda and env["num_threads"] == torch.get_num_threads()
    assert env["seeds"]["torch"] == torch.initial_seed()
    assert env["determinism"]["algorithms"] is False
    was_benchmark = torch.backends.cudnn.benchmark
    was_precision = torch.get_float32_matmul_precision()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("medium")
    try:
        det = fingerprint()["determinism"]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = was_benchmark
        torch.set_float32_matmul_precision(was_precision)
    assert det["algorithms"] is True and det["warn_only"] is True
    assert det["cudnn_benchmark"] is True and det["float32_matmul_precision"] == "medium"


def test_the_seed_the_script_set_is_reported(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        seeds = fingerprint()["seeds"]
    finally:
        torch.random.set_rng_state(state)
    assert seeds == {"PYTHONHASHSEED": "7", "torch": 1234}


def test_cpu_build_knows_its_devices_and_never_brings_cuda_up():
    env = fingerprint()
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        assert env["devices"] == [] and env["device_count"] == 0
    assert not torch.cuda.is_initialized()  # the fingerprint did not bring CUDA up


def test_a_cuda_build_names_devices_only_once_cuda_is_up(monkeypatch):
    """CUDA cannot come up on this machine: torch.cuda is faked (a CUDA build, CUDA down, then up),
    and any question that could bring CUDA up before then is recorded."""
    asked = []

    def forbidden(*a):
        asked.append(a)
        raise RuntimeError("asked the CUDA runtime before CUDA was up")

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", forbidden)
    monkeypatch.setattr(torch.cuda, "get_device_name", forbidden)
    env = fingerprint()
    assert env["cuda"] == "12.4" and env["devices"] is None and env["device_count"] is None
    assert asked == []

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H200 #{i}")
    env = fingerprint()
    assert env["devices"] == ["NVIDIA H200 #0", "NVIDIA H200 #1"] and env["device_count"] == 2


def test_json_values_only():
    env = fingerprint()
    assert json.loads(json.dumps(env, allow_nan=False)) == env
    expected = {
        "python",
        "implementation",
        "platform",
        "cpu",
        "cpu_count",
        "packages",
        "driver",
        "git",
        "seeds",
        "torch",
        "cuda",
        "cudnn",
        "hip",
        "device_count",
        "devices",
        "num_threads",
        "determinism",
    }
    assert set(env) == expected
    assert env["packages"]["optiscope"] and env["packages"]["numpy"]


def test_a_failing_part_is_none_and_the_rest_stays(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("broken")

    monkeypatch.setattr(environment, "_cpu", boom)
    monkeypatch.setattr(environment, "_git", boom)
    monkeypatch.setattr(torch, "get_num_threads", boom)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", boom)
    env = fingerprint()
    assert env["cpu"] is None and env["git"] is None and env["num_threads"] is None
    assert env["determinism"] is None
    assert env["torch"] == torch.__version__ and env["python"]
    monkeypatch.setattr(environment, "_torch_parts", boom)  # the whole torch part: its keys stay, as None
    env = fingerprint()
    assert env["torch"] is None and "devices" in env and env["python"]


def test_driver_version_from_the_proc_file(tmp_path):
    proprietary = tmp_path / "a"
    proprietary.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    open_module = tmp_path / "b"
    open_module.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\n"
    )
    assert environment._driver(str(proprietary)) == "535.104.05"
    assert environment._driver(str(open_module)) == "550.54.15"
    assert environment._driver(str(tmp_path / "absent")) is None


def test_devices_pending_only_when_cuda_came_up_after(monkeypatch):
    before = {"devices": None}
    assert not devices_pending(before)  # CUDA is not up on this machine
    monkeypatch.setattr(environment, "cuda_initialized", lambda: True)
    assert devices_pending(before)
    assert not devices_pending({"devices": ["NVIDIA H100"]}) and not devices_pending(None)


def test_init_imports_no_torch(tmp_path):
    """The fingerprint runs inside init(): a script that never imports torch must not get it."""
    fake = FakeCollector()
    try:
        code = (
            "import sys, optiscope\n"
            f"run = optiscope.init(url={fake.url!r}, spool=False)\n"
            "assert run.finish(timeout=30)\n"
            "assert 'torch' not in sys.modules\n"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        (put,) = fake.puts()  # what the run registered, as the collector received it
        env = put.body["environment"]
        assert env["torch"] is None and env["devices"] is None, env
    finally:
        fake.close()
