"""What optiscope's probe costs a training step, on the reference model, all measured in one run.

    python bench/overhead.py            # reference: pre-LN causal transformer, d=384, 6 layers, ~17M params
    python bench/overhead.py --smoke    # a tiny model, a few steps: CI runs this so the script cannot rot

Configurations, interleaved round by round so that drift on a noisy machine hits them alike:
  bare      the training step alone
  unsampled a probe attached, on a step it does not sample (vitals on, the default, and off)
  defaults  optiscope's defaults (run.watch(optimizer, model)): unsampled + full / every
  full      full statistics on every step (every=1): the default once built, on CPU the native walks
  compiled  the same with torch.compile kernels per tensor (native=False: what accelerators run)
  eager     the same with the eager blocks alone (fused=False: no compiler, or OPTISCOPE_FUSED=0)
  naive     a Python loop of .norm().item() over parameters, gradients and both moments
  floor     one plain copy of the same bytes (parameters, gradients, both moments)
Costs are medians of paired differences: each configuration's step against a bare step next to it
(before it on even rounds, after it on odd ones). On a noisy machine a paired difference of two
half-second steps moves by tens of milliseconds, more than the cost measured, so the full
statistics are also timed directly: the time spent inside the probe's hooks on the training thread
(forward, gradient and optimizer-step hooks), against the copy of the floor timed alone. The direct
figure leaves out indirect costs (caches the probe evicts for the next forward); the paired one
keeps them, with the noise.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from optiscope.probe import OptimizerProbe
from optiscope.probe.activations import ActivationProbe
from optiscope.probe.fused import Kernels
from optiscope.probe.native import Native
from optiscope.run import DEFAULT_EVERY


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class GPT(nn.Module):
    """Pre-LN causal transformer with an untied output head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, ff: int, ctx: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((ctx, ctx), float("-inf")), 1), persistent=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for b in self.blocks:
            x = b(x, self.mask[: idx.shape[1], : idx.shape[1]])
        return self.head(self.ln(x))


SIZES = {
    "reference": dict(vocab=8192, d=384, layers=6, heads=6, ff=1536, ctx=128, batch=4),
    "smoke": dict(vocab=512, d=64, layers=2, heads=2, ff=256, ctx=32, batch=2),
}


def _timed_hooks(hooks: dict, spent: list, part: int = 0) -> None:
    """Wrap every hook of a hook dict (module, tensor or optimizer) in place so that the time spent
    inside it adds to spent[0] and to spent[part]."""
    for k, h in list(hooks.items()):

        def wrapped(*a, _h=h, **kw):
            t0 = time.perf_counter()
            try:
                return _h(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                spent[0] += dt
                if part:
                    spent[part] += dt

        hooks[k] = wrapped


#: What probe_work's list holds, after the total at index 0.
PARTS = (
    "forward hooks (activation maxima)",
    "gradient hooks",
    "optimizer-step hooks (both walks and the series)",
    "of which inside the native walks' kernel calls",
)


def probe_work(model, opt, probe) -> list:
    """Time the probe's own work on the training thread: every hook it registered (forward,
    gradient, optimizer step) wrapped with a timer. The returned list accumulates the total, then
    each of PARTS (the native kernel calls are timed by the wrappers installed in main())."""
    spent = [0.0] * (1 + len(PARTS))
    for m in model.modules():
        _timed_hooks(m._forward_hooks, spent, 1)
    for p in model.parameters():
        _timed_hooks(p._post_accumulate_grad_hooks or {}, spent, 2)
    _timed_hooks(opt._optimizer_step_pre_hooks, spent, 3)
    _timed_hooks(opt._optimizer_step_post_hooks, spent, 3)
    NATIVE_SPENT[:] = [spent]
    return spent


NATIVE_SPENT: list = []  # the list the native kernel calls add to (the current probe's)


def _time_native_calls() -> None:
    """Wrap Native.pre and Native.post so that their time adds to the current probe's last part."""
    for name in ("pre", "post"):
        real = getattr(Native, name)

        def timed(*a, _real=real):
            t0 = time.perf_counter()
            try:
                return _real(*a)
            finally:
                if NATIVE_SPENT:
                    NATIVE_SPENT[0][-1] += time.perf_counter() - t0

        setattr(Native, name, staticmethod(timed))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and few rounds (CI)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--every", type=int, default=DEFAULT_EVERY, help="sampling period of the defaults")
    args = ap.parse_args()
    size = SIZES["smoke" if args.smoke else "reference"]
    rounds = args.rounds or (4 if args.smoke else 20)
    torch.manual_seed(0)
    batch = size.pop("batch")
    model = GPT(**size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    data = torch.randint(0, size["vocab"], (batch, size["ctx"] + 1))
    params = list(model.parameters())

    def step():
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, size["vocab"]), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm up: allocator, Adam state
        step()
    sink = []
    names = {id(p): n for n, p in model.named_parameters()}
    moments = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    floor_dst = [t.clone() for t in params + [p.grad for p in params] + moments]

    def timed(fn=step):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    scratch = {}

    work, learnt, parts = {}, {}, {}
    _time_native_calls()

    def probe_step(every, fused=True, native=True, vitals=True):
        """One step with a probe attached; every=None: attached, but this step is not sampled.
        Also records, under work[path], the time spent inside the probe's hooks (and in the
        vitals' end-of-backward callback)."""
        path = "eager" if not fused else "full" if native else "compiled"
        if every is None:
            path = "unsampled" if vitals else "unsampled_off"
        probe = OptimizerProbe(
            opt,
            lambda s, h, v: sink.append(v[1].tolist() if v else None),
            every=every or 10**9,
            names=names,
            fused=fused,
            native=native,
            vitals=vitals,
        )
        # a watched run keeps one probe for the whole run, and with it its work buffers and what
        # it learnt on its first sampled step (that nothing changes the gradients before the step)
        probe._scratch = scratch.setdefault(path, probe._scratch)
        if every is not None and path in learnt:
            probe._measure_in_backward, probe._grads_change = learnt[path]
        act = ActivationProbe(
            model, probe.sampling_next, native=probe.native, vitals=vitals
        )  # as run.watch attaches it
        probe.contributors.append(act)
        if every is None:
            probe.steps = 1  # past step 0, the only step a huge period samples
        spent = probe_work(model, opt, probe)
        real_norm = probe._vital_norm

        def timed_norm():  # queued by the gradient hooks, run when backward ends
            t0 = time.perf_counter()
            try:
                real_norm()
            finally:
                spent[0] += time.perf_counter() - t0
                spent[2] += time.perf_counter() - t0

        probe._vital_norm = timed_norm
        try:
            return timed()
        finally:
            NATIVE_SPENT.clear()
            work.setdefault(path, []).append(spent[0])
            if every is not None:
                parts.setdefault(path, []).append(spent[1:])
                learnt[path] = (probe._measure_in_backward, probe._grads_change)
            probe.close()
            act.close()
            sink.clear()

    def naive():
        step()
        for t in (
            params + [p.grad for p in params] + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
        ):
            t.norm().item()  # one host sync per tensor: what a hand-rolled logger does

    floor_alone = []

    def floor():
        step()
        grads = [p.grad for p in params]
        moments_now = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
        t0 = time.perf_counter()
        torch._foreach_copy_(floor_dst, params + grads + moments_now)
        floor_alone.append(time.perf_counter() - t0)

    # The native walks build and the fused kernels compile in the background on the first sampled
    # step (training goes on meanwhile, with the eager blocks); the table is about the steps after.
    t0 = time.perf_counter()
    probe_step(1)
    built = Native.wait(timeout=900)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe_step(1, native=False)
    compiled = Kernels()  # the process's compiled kernels (shared by every probe)
    ready = compiled.wait(timeout=900)
    probe_step(1, native=False)  # the kernels that need Adam's state (asked for at the step above)
    ready = compiled.wait(timeout=900) and ready
    compile_s = time.perf_counter() - t0
    probe_step(1)
    probe_step(1, native=False)
    probe_step(1, fused=False)
    work.clear()
    parts.clear()

    # Each configuration's step is paired with a bare step next to it; the cost is the median of
    # the paired differences, so slow drift on a shared machine cancels.
    configs = {
        "unsampled": lambda: probe_step(None),
        "unsampled_off": lambda: probe_step(None, vitals=False),
        "full": lambda: probe_step(1),
        "compiled": lambda: probe_step(1, native=False),
        "eager": lambda: probe_step(1, fused=False),
        "naive": lambda: timed(naive),
        "floor": lambda: timed(floor),
    }
    rows = {k: [] for k in ("bare", *configs)}
    for r in range(rounds):
        for k, run in configs.items():
            # alternate which of the pair runs first: the second step of a pair tends to be faster
            if r % 2:
                other = run()
                bare = timed()
            else:
                bare = timed()
                other = run()
            rows["bare"].append(bare)
            rows[k].append(other - bare)
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["hooks"] = statistics.median(work["unsampled"])
    med["hooks_bare"] = statistics.median(work["unsampled_off"])
    for path in ("full", "compiled", "eager"):
        med[f"{path}_work"] = statistics.median(work[path])
    med["floor_alone"] = statistics.median(floor_alone)
    # The defaults sample one step in `every`: the unsampled cost on every step plus the full cost
    # amortised over the period.
    # The paired difference for an unsampled step is below this machine's noise (it can come out
    # negative); the hooks' own time on real steps, measured directly, is the cost that goes into
    # the defaults (with vitals: their reductions in backward and the end-of-backward callback).
    med["defaults"] = med["hooks"] + med["full"] / args.every
    bare, floor_cost = med["bare"], med["floor"]
    print(
        f"# optiscope probe overhead: {'smoke' if args.smoke else 'reference'} model, {n_params / 1e6:.1f}M params, "
        f"AdamW, batch {batch}x{size['ctx']} tokens, {torch.get_num_threads()} threads, {rounds} rounds, "
        f"defaults sample 1 step in {args.every}"
    )
    print()
    print("| configuration | step time (ms, median) | cost per step (ms) | cost / bare step | cost / floor |")
    print("|---|---|---|---|---|")
    print(f"| bare | {bare * 1e3:.1f} | — | — | — |")
    for k, label in (
        ("unsampled", "attached, step not sampled (paired)"),
        ("hooks", "attached, step not sampled (hooks timed directly)"),
        ("unsampled_off", "the same with vitals off (paired)"),
        ("hooks_bare", "the same with vitals off (hooks timed directly)"),
        ("defaults", f"defaults (every={args.every}, amortised)"),
        ("full", "full statistics, every step (native walks)"),
        ("compiled", "full statistics, every step (torch.compile kernels)"),
        ("eager", "full statistics, every step (eager blocks)"),
        ("naive", "naive .norm().item() loop"),
        ("floor", "floor: one copy of θ, g, m, v"),
        ("full_work", "full statistics (native walks), time inside the probe's hooks"),
        ("compiled_work", "full statistics (torch.compile kernels), time inside the probe's hooks"),
        ("eager_work", "full statistics (eager blocks), time inside the probe's hooks"),
        ("floor_alone", "floor: the copy alone, timed directly"),
    ):
        c = med[k]
        # direct timings are compared with the directly timed copy, paired ones with the paired copy
        ref = med["floor_alone"] if k.endswith(("_work", "_alone")) else floor_cost
        print(f"| {label} | {(bare + c) * 1e3:.1f} | {c * 1e3:.2f} | {100 * c / bare:.2f}% | {c / ref:.2f}x |")
    print()
    print("where the time inside the probe's hooks goes on a sampled step (native walks, medians):")
    print()
    print("| part | ms | / floor copy timed alone |")
    print("|---|---|---|")
    for j, label in enumerate(PARTS):
        v = statistics.median(x[j] for x in parts["full"])
        print(f"| {label} | {v * 1e3:.2f} | {v / med['floor_alone']:.2f}x |")
    print()
    print(
        f"native walks: {'built' if built else 'NOT available (the eager blocks served)'}, "
        f"{build_s:.1f} s in the background before the first native step (once per process)"
    )
    print(
        f"fused kernels: {'compiled' if ready else 'NOT available (the eager blocks served)'}, "
        f"{compile_s:.1f} s in the background before the first fused step (once per process)"
    )
    full_ratio = med["full"] / floor_cost
    direct_ratio = med["full_work"] / med["floor_alone"]
    defaults_pct = 100 * med["defaults"] / bare
    quiet_pct = 100 * (med["hooks_bare"] + med["full"] / args.every) / bare
    print(
        f"targets: defaults <= 1% of the step: {defaults_pct:.2f}% "
        f"({'met' if defaults_pct <= 1 else 'NOT met'}; with vitals off {quiet_pct:.2f}%, "
        f"{'met' if quiet_pct <= 1 else 'NOT met'}); full statistics <= 2x the floor: "
        f"timed directly {direct_ratio:.2f}x ({'met' if direct_ratio <= 2 else 'NOT met'}), "
        f"paired steps {full_ratio:.2f}x ({'met' if full_ratio <= 2 else 'NOT met'})"
    )
    suggested = math.ceil(med["full"] / (0.01 * bare))
    print(f"sampling period that keeps the full statistics under 1% of this step: every >= {suggested}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
