"""Divergence detection quality: optiscope attached to real training runs, scored against ground truth.

    python bench/detection.py                    # the 11 scenarios of bench/detection_kit, seeds 0-2
    python bench/detection.py --seeds 0-5        # more seeds (each seed is a different run of every scenario)
    python bench/detection.py --suite other.py   # another scenario file in the kit's format
    python bench/detection.py --smoke            # two scenarios, one seed: CI runs this so the script cannot rot

Every run is a real PyTorch training loop (`kit.run`), and optiscope is attached as a user attaches it:
`optiscope.init(config=<the run's declared config>, detect=True, offline=True)` then
`run.watch(optimizer, model)` (default sampling, vitals on), and the loss is logged from the loop's callback.
`detect=True` runs `optiscope.detect.default_detectors(config)` on the SDK's exporter thread over the very
records the collector would receive: the collector runs the same detectors on the same records. The
steps of the *paging* alerts that fired are the alarms; warnings are counted but never scored.

Baseline in the same run: the kit's reference rule (`nan_or_10x_min`: NaN, or loss above 10x its running
minimum after 20 steps) sees the same runs through the same callback.

Targets (from the issue): recall >= 0.95, early recall >= 0.90, median lead >= 60 steps, <= 0.5 false
alarms per 10k clean steps and <= 3 per 10k benign steps, event precision >= 0.8, and every non-finite
failure forewarned >= 20 steps. `--check` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "detection_kit"))
sys.path.insert(0, str(HERE.parent / "sdk" / "src"))
import kit  # noqa: E402

SMOKE = ("mlp_lr_ramp", "mlp_corrupt_batch_recovers")
TARGETS = {
    "recall": (">=", 0.95),
    "early_recall": (">=", 0.90),
    "median_lead": (">=", 60),
    "fa10k_clean": ("<=", 0.5),
    "fa10k_benign": ("<=", 3.0),
    "precision": (">=", 0.8),
}
NAN_LEAD = 20


class Attached:
    """The callback the kit calls after every step: logs the loss to the optiscope run; the kit's
    reference rule watches the same loss."""

    def __init__(self, run, name):
        self.run, self.name = run, name
        self.alarms: list[int] = []
        self.reference = _TenXMin()
        self.extra: dict = {}

    def __call__(self, step, loss, model, optimizer):
        self.run.log({"loss": loss}, step=step)
        self.reference(step, loss)

    def close(self):
        delivered = self.run.finish(timeout=60)
        pages = [e for e in self.run.alerts if e.state == "firing" and e.severity == "page"]
        self.alarms = [e.step for e in pages]
        self.extra = {
            "reference": self.reference.alarms,
            "delivered": delivered,
            "rules": collections.Counter(e.rule for e in self.run.alerts if e.state == "firing"),
            "first": [(e.step, e.rule, e.message) for e in pages[:3]],
        }


class _TenXMin:
    """The kit's example rule (example.py): a non-finite loss, or after 20 steps one above 10x its running minimum."""

    def __init__(self):
        self.alarms, self.m, self.n = [], math.inf, 0

    def __call__(self, step, loss):
        self.n += 1
        if not math.isfinite(loss) or (self.n > 20 and loss > 10 * self.m):
            self.alarms.append(step)
        if math.isfinite(loss):
            self.m = min(self.m, loss)


def attach(scenario, seed, spec):
    import optiscope

    run = optiscope.init(
        project="detection-bench",
        name=f"{scenario.name}-{seed}",
        config=spec.declared,
        detect=True,
        offline=True,
        spool=False,
        environment=False,
        heartbeat_interval=None,
    )
    run.watch(spec.optimizer, spec.model)
    return Attached(run, scenario.name)


def parse_seeds(s: str) -> list[int]:
    out: list[int] = []
    for part in s.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def check(sc: dict) -> list[str]:
    missed = []
    for k, (op, bound) in TARGETS.items():
        v = sc[k]
        if isinstance(v, float) and math.isnan(v):
            continue  # no run of that kind in this selection
        if not (v >= bound if op == ">=" else v <= bound):
            missed.append(f"{k} {v:.3g} (target {op} {bound})")
    short = [lead for lead in sc["nan_leads"] if lead < NAN_LEAD]
    if short:
        missed.append(f"non-finite failures forewarned < {NAN_LEAD} steps: {short}")
    return missed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default=str(HERE / "detection_kit" / "scenarios.py"))
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = ap.parse_args()
    seeds = [0] if a.smoke else parse_seeds(a.seeds)
    suite = kit.load_suite(a.suite)
    names = list(SMOKE) if a.smoke else [n for n in suite.names() if not a.only or n in a.only.split(",")]
    t0 = time.perf_counter()
    results = kit.run_suite(suite, seeds=seeds, names=names, attach=attach, workers=a.workers)
    wall = time.perf_counter() - t0
    ours = kit.score(results, name="optiscope", verbose=False)
    ref = kit.score(
        [{**r, "alarms": r["extra"]["reference"]} for r in results], name="nan_or_10x_min (kit)", verbose=False
    )
    print(f"## Detection: {len(results)} runs ({len(names)} scenarios x seeds {seeds}), wall {wall:.0f} s\n")
    print(kit.table([ours, ref]))
    print()
    print(kit.per_scenario_table([ours, ref]))
    rules = collections.Counter()
    for r in results:
        rules.update({(r["kind"], rule): n for rule, n in r["extra"]["rules"].items()})
    print("\nalerts fired, by run kind and rule (warnings included; only pages are scored):")
    for (kind, rule), n in sorted(rules.items()):
        print(f"  {kind:8s} {rule:24s} {n}")
    print(f"\nnon-finite failures: lead of the first alarm to the NaN step: {ours['nan_leads']}")
    undelivered = [f"{r['scenario']}/{r['seed']}" for r in results if not r["extra"]["delivered"]]
    print(f"records lost by the SDK: {'none' if not undelivered else ', '.join(undelivered)}")
    missed = check(ours)
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if (undelivered or (a.check and missed)) else 0


if __name__ == "__main__":
    sys.exit(main())
