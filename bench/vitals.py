"""What the per-step vitals cost a training step that is not sampled, and whether they sync.

    python bench/vitals.py              # the overhead bench's reference transformer, on CUDA if present, else CPU
    python bench/vitals.py --dtype fp16 # the same with float16 autocast (activation headroom vitals on every step)
    python bench/vitals.py --smoke      # a tiny model, a few rounds: CI runs this so the script cannot rot

With vitals on (the default of `run.watch`), every optimizer step, sampled or not, records the
gradient norm before clipping (one reduction per parameter in backward, stacked on the device) and,
where float16/float8 outputs exist, their tightest headroom. Three configurations of an unsampled
step, interleaved round by round so that drift hits them alike: bare (no probe), vitals off (the
probe's hooks only), vitals on. Medians of per-round step times; on CUDA each step is synchronized
after it (outside the timed hooks' own work) so that the time is the GPU's.

On CUDA the script also runs the attached steps under `torch.cuda.set_sync_debug_mode("error")`:
any host-device sync the probe adds on an unsampled step raises there, and the script exits 1.
Also checked: the per-step gradient norm equals a float64 recomputation of the gradients before
clipping (clipping at 1.0 runs after backward, as in most training loops).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk" / "src"))
from overhead import GPT, SIZES  # noqa: E402

from optiscope.probe import OptimizerProbe  # noqa: E402
from optiscope.probe.activations import ActivationProbe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = dict(SIZES["smoke" if a.smoke else "reference"])
    rounds = a.rounds or (5 if a.smoke else 30)
    batch = size.pop("batch") * (1 if a.smoke or not cuda else 8)
    torch.manual_seed(0)
    model = GPT(**size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda)
    data = torch.randint(0, size["vocab"], (batch, size["ctx"] + 1), device=device)
    half = a.dtype == "fp16"
    seen: list = []

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=half and cuda):
            logits = model(data[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, size["vocab"]).float(), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()

    def timed():
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def attach(vitals: bool):
        probe = OptimizerProbe(opt, lambda s, h, v: seen.append(h), every=10**9, vitals=vitals)
        act = ActivationProbe(model, probe.sampling_next, native=probe.native, vitals=vitals)
        probe.contributors.append(act)
        probe.steps = 1  # past step 0, the only step a huge period samples
        return probe, act

    for _ in range(3):
        step()
    # correctness and syncs: the per-step norm against float64, under the sync checker
    probe, act = attach(True)
    refs = []
    for _ in range(3):
        with torch.autocast(device.type, dtype=torch.float16, enabled=half and cuda):
            loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, size["vocab"]).float(), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        refs.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    got = [float(h["grad_norm"]) for h in seen[-3:]]
    heads = [h.get("act_headroom_bits") for h in seen[-3:]]
    probe.close()
    act.close()
    ok = all(abs(g - r) <= 1e-4 * r for g, r in zip(got, refs))
    syncs_ok = True
    if cuda:
        probe, act = attach(True)
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                step()
        except RuntimeError as e:
            syncs_ok = False
            print(f"SYNC on an unsampled step: {e}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
            probe.close()
            act.close()

    times = {"bare": [], "vitals off": [], "vitals on": []}
    for _ in range(rounds):
        for k in times:
            probe = act = None
            if k != "bare":
                probe, act = attach(k == "vitals on")
            times[k].append(timed())
            seen.clear()
            if probe is not None:
                probe.close()
                act.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(p.numel() for p in model.parameters())
    print(
        f"# vitals on an unsampled step: {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
        f"{n / 1e6:.1f}M params, {len(list(model.parameters()))} tensors, batch {batch}x{size['ctx']}, "
        f"{a.dtype}, {rounds} rounds"
    )
    print()
    print("| configuration | step time (ms, median) | cost / bare step |")
    print("|---|---|---|")
    base = med["bare"]
    for k, v in med.items():
        cost = "—" if k == "bare" else f"{100 * (v - base) / base:+.2f}%"
        print(f"| {k} | {v * 1e3:.2f} | {cost} |")
    print()
    print(
        f"per-step grad_norm equals the float64 pre-clip norm: {'yes' if ok else 'NO'} ({got[0]:.6g} vs {refs[0]:.6g})"
    )
    print(f"act_headroom_bits on unsampled steps: {heads[-1]!r}")
    print(
        f"host-device syncs on unsampled steps: {'none (sync debug mode error)' if cuda and syncs_ok else 'FOUND' if cuda else 'not checked (no CUDA)'}"
    )
    return 0 if ok and syncs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
