"""The disk spool: nothing that reached it is lost when the training process is killed or the
collector is away, and a damaged tail costs only the frames from the damage on.

Every run logs a known sequence; the checks compare what the store holds with it, exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from optiscope import wire
from optiscope.transport import spool as sp

from conftest import BIN, Collector, free_port, wait_until

TRAINER = """
import os, sys, time, optiscope
run = optiscope.init(project="faults", url=sys.argv[1], max_batch_records=50, flush_interval=0.05)
print(run.id, flush=True)
for step in range(int(sys.argv[2])):
    run.log({"x": float(step)}, step=step)
    if step % 50 == 49:
        time.sleep(0.02)  # let the exporter spool a batch
    if step == int(sys.argv[3]):
        print("READY", flush=True)
        time.sleep(600)  # killed here
"""


def _batches(n: int) -> list[bytes]:
    return [wire.encode_batch(wire.Batch("r1", 0, i, [(i, 0.0, {"x": float(i)})])) for i in range(n)]


def test_reader_recovers_everything_before_a_torn_or_flipped_tail(tmp_path):
    bodies = _batches(20)
    seg = tmp_path / "0.seg"
    seg.write_bytes(b"".join(sp.frame(b) for b in bodies))
    assert list(sp.read_frames(seg)) == bodies
    full = seg.read_bytes()
    rng = random.Random(0)
    for _ in range(50):  # truncated anywhere: every whole frame before the cut survives
        cut = rng.randrange(len(full))
        seg.write_bytes(full[:cut])
        got = list(sp.read_frames(seg))
        assert got == bodies[: len(got)]
        assert sum(len(sp.frame(b)) for b in got) <= cut < sum(len(sp.frame(b)) for b in bodies[: len(got) + 1])
    for _ in range(50):  # one bit flipped: the frames before the damaged one survive, nothing wrong is read
        pos = rng.randrange(len(full))
        damaged = bytearray(full)
        damaged[pos] ^= 1 << rng.randrange(8)
        seg.write_bytes(bytes(damaged))
        got = list(sp.read_frames(seg))
        first_bad = next(i for i in range(len(bodies)) if pos < sum(len(sp.frame(b)) for b in bodies[: i + 1]))
        assert got == bodies[:first_bad]


def test_killed_trainer_is_replayed_by_sync(tmp_path, spool_dir):
    """SIGKILL mid-run with the collector away; `optiscope sync` later delivers every spooled point."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OPTISCOPE_SPOOL_DIR": str(spool_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, url, "1000", "499"], stdout=subprocess.PIPE, text=True, env=env
    )
    run_id = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.5)  # the exporter spools what is queued
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    spools = sp.pending_spools(spool_dir)
    assert [d.name for d in spools] == [f"{run_id}-0"]
    spooled_steps = sorted(
        s
        for seg in spools[0].glob("*.seg")
        for body in sp.read_frames(seg)
        for s, _, values in wire.decode_batch(body).records
        if "x" in values
    )
    assert spooled_steps == list(range(500))  # everything logged before the kill reached the disk

    c = Collector(f"sqlite:///{tmp_path / 'o.db'}", cwd=tmp_path)
    c.port, c.url = port, url
    c.start()
    try:
        r = subprocess.run(
            [str(BIN / "optiscope"), "sync", "--url", url], env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr
        data = c.api(f"/runs/{run_id}/series/x")
        assert data["steps"] == list(range(500)) and data["values"] == [float(s) for s in range(500)]
        assert c.api(f"/runs/{run_id}")["status"] == "crashed"  # it never called finish()
        assert sp.pending_spools(spool_dir) == []
        # a second sync has nothing to do, and nothing was stored twice
        r = subprocess.run(
            [str(BIN / "optiscope"), "sync", "--url", url], env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and r.stdout == ""
        assert c.api(f"/runs/{run_id}/series/x")["steps"] == list(range(500))
    finally:
        c.stop()


def test_next_run_replays_what_an_earlier_run_left(tmp_path, spool_dir):
    """A run that ended while the collector was away leaves its spool; the next run sends it."""
    import optiscope

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = optiscope.init(project="faults", url=url, flush_interval=0.05)
    for step in range(300):
        first.log({"x": float(step)}, step=step)
    assert first.finish(timeout=1) is False  # nobody listening: kept in the spool
    assert [d.name for d in sp.pending_spools(spool_dir)] == [f"{first.id}-0"]
    c = Collector(f"sqlite:///{tmp_path / 'o.db'}", cwd=tmp_path)
    c.port, c.url = port, url
    c.start()
    try:
        second = optiscope.init(project="faults", url=url)
        second.log({"x": 1.0}, step=0)
        assert second.finish(timeout=30)
        wait_until(lambda: sp.pending_spools(spool_dir) == [], what="the first run's spool to be replayed")
        assert c.api(f"/runs/{first.id}/series/x")["steps"] == list(range(300))
        assert c.api(f"/runs/{first.id}")["status"] == "finished"  # its own finish() status, kept in end.json
        assert second.counters["replayed_batches"] >= 1
    finally:
        c.stop()


def test_spool_cap_and_a_live_writer_is_not_replayed(tmp_path, spool_dir):
    import optiscope

    run = optiscope.init(
        project="faults",
        url=f"http://127.0.0.1:{free_port()}",
        spool_max_bytes=2000,
        flush_interval=0.05,
        max_batch_records=10,
    )
    for step in range(200):
        run.log({"x": float(step)}, step=step)
    wait_until(lambda: run.counters["spool_full"] > 0, what="the spool cap")
    (live,) = sp.pending_spools(spool_dir)
    assert sum(f.stat().st_size for f in live.glob("*.seg")) <= 2000
    assert sp.replay(live, object()) == ("busy", 0)  # its writer holds the lock
    run.finish(timeout=0.2)
    assert Path(live, "end.json").exists()
