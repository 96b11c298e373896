"""The collector is SIGKILLed and restarted several times during a run, and DataLoader workers fork
while the exporter runs: every logged point is stored exactly once, and nothing hangs."""

from __future__ import annotations

import signal
import time

import torch

import optiscope

from conftest import Collector, wait_until


def test_collector_killed_and_restarted_during_a_run(tmp_path, spool_dir):
    db = f"sqlite:///{tmp_path / 'o.db'}"
    c = Collector(db, cwd=tmp_path).start()
    run = optiscope.init(project="restarts", url=c.url, flush_interval=0.02, max_batch_records=25, backoff_max=0.3)
    steps = 2000
    try:
        for step in range(steps):
            run.log({"x": float(step)}, step=step)
            if step % 400 == 399:  # four hard kills, each followed by a restart on the same port
                c.stop(signal.SIGKILL)
                time.sleep(0.2)
                c.start()
            elif step % 20 == 0:
                time.sleep(0.005)
        assert run.finish(timeout=60), run.counters
        data = c.api(f"/runs/{run.id}/series/x")
        assert data["steps"] == list(range(steps))  # nothing missing, nothing twice
        assert data["values"] == [float(s) for s in range(steps)]
        assert run.counters["dropped"] == 0
        assert run.counters["retries"] > 0  # the kills were felt: this is not a quiet run
    finally:
        c.stop()


def test_dataloader_workers_fork_while_the_exporter_runs(sqlite_collector):
    run = optiscope.init(project="fork", url=sqlite_collector.url, flush_interval=0.01)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            run.log({"from_worker": float(i)}, step=i)  # in a forked worker: must be a silent no-op
            return torch.tensor([float(i)])

    loader = torch.utils.data.DataLoader(Data(), batch_size=8, num_workers=2, multiprocessing_context="fork")
    step = 0
    for _ in range(3):  # three epochs: workers are forked three times while the exporter is busy
        for batch in loader:
            run.log({"x": float(batch.sum())}, step=step)
            step += 1
    assert run.finish(timeout=30)
    names = {s["name"] for s in sqlite_collector.api(f"/runs/{run.id}/series")["series"]}
    assert "from_worker" not in names
    data = sqlite_collector.api(f"/runs/{run.id}/series/x")
    assert data["steps"] == list(range(24))
    wait_until(lambda: sqlite_collector.api(f"/runs/{run.id}")["status"] == "finished", what="finished")
