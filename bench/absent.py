"""A whole training run while no collector exists, then the collector appears: what it costs the
training loop, what it costs in memory, and whether every point arrives.

    python bench/absent.py            # 2,000 paired steps of a small transformer on CPU
    python bench/absent.py --smoke    # a tiny model, 150 steps: CI runs this so it cannot rot

One process trains two identical models side by side, step by step (the order alternates each
round): one bare, one with ``run.watch(optimizer, model)`` and a ``run.log`` of the loss, the
accuracy and the throughput after every step, pointed at a loopback port where nothing listens.
Then a real collector (``optiscope serve``) starts on that port, ``run.finish()`` delivers what the
SDK kept, and the REST API and ``/metrics`` are checked: every logged point arrived, exactly once.
Exit status 1 when they did not.

Only public APIs are used (``optiscope.init``, ``run.watch``, ``run.log``, ``run.finish``,
``run.counters``, the REST API), so the numbers stay meaningful whatever the transport does inside.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from overhead import GPT  # the overhead benchmark's transformer (this folder is on sys.path)

import optiscope

SIZES = {
    "reference": dict(vocab=2048, d=128, layers=2, heads=4, ctx=64, batch=4, steps=2000),
    "smoke": dict(vocab=256, d=32, layers=2, heads=2, ctx=16, batch=2, steps=150),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def thread_cpu_s(name: str) -> float | None:
    """CPU seconds (user + system) of this process's Python thread called ``name``; None if there
    is none (the name is the SDK's business, so its absence only costs this one number)."""
    tick = os.sysconf("SC_CLK_TCK")
    for t in threading.enumerate():
        if t.name == name and t.native_id is not None:
            try:
                fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            return (int(fields[11]) + int(fields[12])) / tick
    return None


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()


def stored_series(base: str, name: str) -> dict:
    """One series as the REST API returns it; empty when the collector has none of it."""
    try:
        return get(f"{base}/series/{name}?limit=100000")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return {"steps": [], "values": []}
        raise


def start_collector(port: int, workdir: Path, timeout: float = 60.0) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "optiscope"
    log = open(workdir / "collector.log", "w")
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--port",
            str(port),
            "--db",
            f"sqlite:///{workdir / 'optiscope.db'}",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the collector exited with {proc.returncode}:\n" + (workdir / "collector.log").read_text()[-4000:]
            )
        try:
            if get(f"http://127.0.0.1:{port}/healthz", timeout=1)["status"] == "ok":
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(
        f"the collector did not answer /healthz within {timeout:.0f}s:\n"
        + (workdir / "collector.log").read_text()[-4000:]
    )


def metric(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and few steps (CI)")
    ap.add_argument("--steps", type=int, default=None, help="paired steps (each model takes this many)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    load = os.getloadavg()[0]  # the machine's, before this run adds its own
    size = dict(SIZES["smoke" if args.smoke else "reference"])
    steps, batch = args.steps or size.pop("steps"), size.pop("batch")
    size.pop("steps", None)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="optiscope-absent-"))
    os.environ["OPTISCOPE_SPOOL_DIR"] = str(work / "spool")  # never the user's cache
    port = free_port()  # nothing listens here until the collector starts in part (c)

    torch.manual_seed(0)
    models = [GPT(**size, ff=4 * size["d"]), GPT(**size, ff=4 * size["d"])]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1) for m in models]
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, size["vocab"], (64, batch, size["ctx"] + 1), generator=gen)
    n_params = sum(p.numel() for p in models[0].parameters())
    run = optiscope.init(
        project="bench-absent", url=f"http://127.0.0.1:{port}", config={"steps": steps, "params": n_params}
    )
    run.watch(opts[1], models[1])
    logged: list[tuple] = []  # what run.log was given, read back after the run to check delivery

    def step(i: int, k: int) -> float:
        model, opt, xy = models[k], opts[k], data[i % len(data)]
        t0 = time.perf_counter()
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, size["vocab"]), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # What a training script logs: 0-d tensors (no host sync here) and a host float. Both
        # loops compute them; only the attached one hands them to run.log.
        loss, acc = loss.detach(), (logits.detach().argmax(-1) == xy[:, 1:]).float().mean()
        tput = batch * size["ctx"] / (time.perf_counter() - t0)
        if k:
            run.log({"loss": loss, "accuracy": acc, "tokens_per_s": tput})
        t = time.perf_counter() - t0
        if k:  # as floats, outside the timed part: small tensors kept for the whole run would pin
            # glibc heap pages between the large activation buffers and grow the RSS measured here
            logged.append((loss.item(), acc.item(), tput))
        return t

    times: list[list[float]] = [[], []]
    # Memory is counted from the end of the first steps: by then the allocator, Adam's state and
    # the probe's first sampled step have taken what they keep; what grows after is the SDK's.
    warm = min(50, steps // 10)
    rss0 = rss_peak = rss_mid = rss()
    t_train = time.perf_counter()
    for i in range(steps):
        # Alternate which model goes first: the second step of a pair tends to run warmer.
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            times[k].append(step(i, k))
        if i == warm:
            rss0 = rss_peak = rss()
        rss_peak = max(rss_peak, rss())
        if i == steps // 2:
            rss_mid = rss()
    t_train = time.perf_counter() - t_train
    rss_end, exporter_cpu = rss(), thread_cpu_s("optiscope-exporter")
    spool_bytes, before = tree_bytes(work / "spool"), run.counters

    # (c) The collector appears; finish() delivers what the SDK kept in memory and in the spool.
    proc = start_collector(port, work)
    try:
        t0 = time.perf_counter()
        delivered = run.finish(timeout=120)
        t_deliver = time.perf_counter() - t0
        after = run.counters
        base = f"http://127.0.0.1:{port}/api/v1/runs/{run.id}"
        problems = [] if delivered else ["run.finish() reported undelivered data"]
        for j, name in enumerate(("loss", "accuracy", "tokens_per_s")):
            got = stored_series(base, name)
            want = [v[j] for v in logged]
            if got["steps"] != list(range(steps)) or got["values"] != want:
                problems.append(f"{name}: {len(got['steps'])} points stored, {steps} logged, or values differ")
        lr = stored_series(base, "lr")
        if lr["steps"] != list(range(steps)):
            problems.append(f"lr: {len(lr['steps'])} steps stored, {steps} taken")
        status = get(base)["status"]
        if status != "finished":
            problems.append(f"run status is {status!r}")
        m = get(f"http://127.0.0.1:{port}/metrics")
        stored_points = metric(m, "optiscope_ingest_points_total")
        stored_batches = metric(m, 'optiscope_ingest_batches_total{outcome="stored"}')
        # Exactly once: the collector stored each batch the SDK saw acknowledged once, no more.
        if stored_points != after["sent_points"] or stored_batches != after["sent_batches"]:
            problems.append(
                f"collector stored {stored_points:.0f} points in {stored_batches:.0f} batches; the SDK "
                f"had {after['sent_points']} acknowledged in {after['sent_batches']}"
            )
        if after["dropped"] or after["rejected_batches"] or after["bad_values"]:
            problems.append(f"SDK counters: {after}")
        spool_left = tree_bytes(work / "spool")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    bare, att = statistics.median(times[0]), statistics.median(times[1])
    paired = statistics.median(a - b for a, b in zip(times[1], times[0]))
    mean_bare, mean_att = statistics.fmean(times[0]), statistics.fmean(times[1])
    mib = 1 / 2**20
    print(
        f"# collector absent for a whole run: {'smoke' if args.smoke else 'reference'} transformer, "
        f"{n_params / 1e6:.2f}M params, AdamW, batch {batch}x{size['ctx']} tokens, {torch.get_num_threads()} "
        f"threads, {steps} paired steps, run.watch defaults, 3 values logged per step, "
        f"1-min load average before the run {load:.1f} on {os.cpu_count()} CPUs"
    )
    print()
    print("| measure | bare | optiscope attached, collector absent | attached / bare |")
    print("|---|---|---|---|")
    print(f"| step time, median (ms) | {bare * 1e3:.2f} | {att * 1e3:.2f} | {att / bare:.3f} |")
    print(f"| step time, paired difference, median (ms) | — | {paired * 1e3:+.3f} | {1 + paired / bare:.3f} |")
    print(
        f"| step time, mean incl. sampled steps (ms) | {mean_bare * 1e3:.2f} | {mean_att * 1e3:.2f} | "
        f"{mean_att / mean_bare:.3f} |"
    )
    cpu = "n/a" if exporter_cpu is None else f"{exporter_cpu:.2f} s ({100 * exporter_cpu / t_train:.1f}% of the run)"
    print(f"| exporter thread CPU during training | — | {cpu} | — |")
    print(
        f"| RSS growth after step {warm}: at mid-run / peak / end (MiB) | — | {(rss_mid - rss0) * mib:.1f}"
        f" / {(rss_peak - rss0) * mib:.1f} / {(rss_end - rss0) * mib:.1f} | — |"
    )
    print(
        f"| spool on disk at end of training (MiB) | — | {spool_bytes * mib:.2f} "
        f"({before['spooled_batches']} batches) | — |"
    )
    print(
        f"| SDK counters at end of training | — | retries {before['retries']}, dropped {before['dropped']}, "
        f"spool_full {before['spool_full']}, sent_points {before['sent_points']} | — |"
    )
    print(
        f"| delivered after the collector started | — | {after['sent_points']} points in {after['sent_batches']} "
        f"batches, {t_deliver:.1f} s; spool left {spool_left} bytes | — |"
    )
    print()
    if problems:
        print("delivery: FAILED: " + "; ".join(problems) + f" (spool and collector log kept in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"delivery: every point arrived exactly once ({steps} steps x 3 logged series, lr at every step, "
        f"{after['sent_points']} points stored once)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
