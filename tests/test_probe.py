"""The optimizer probe against an independent float64 recomputation, for every Adam implementation.

The reference is computed from the gradients as backward left them (before clipping), the
parameters before and after ``optimizer.step()`` and the optimizer's own state, in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optiscope.probe import OptimizerProbe
from probe_reference import Reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VARIANTS = [
    pytest.param(dict(foreach=False), id="for-loop"),
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(dict(fused=True), id="fused"),
    pytest.param(dict(foreach=False, amsgrad=True), id="for-loop-amsgrad"),
    pytest.param(dict(foreach=True, amsgrad=True), id="foreach-amsgrad"),
    pytest.param(dict(fused=True, amsgrad=True), id="fused-amsgrad"),
]
if torch.cuda.is_available():  # capturable needs an accelerator; CI has none, a lent GPU runs these
    VARIANTS += [pytest.param(dict(capturable=True, foreach=True), id="capturable-foreach"),
                 pytest.param(dict(capturable=True, foreach=False), id="capturable-for-loop")]


def n64(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class Capture:
    """The probe's emit callback: every step's host values and, on sampled steps, its vector."""

    def __init__(self):
        self.steps: dict[int, dict[str, float]] = {}
        self.every_step: dict[int, dict] = {}

    def __call__(self, step, values, vector):
        self.every_step[step] = dict(values)
        if vector is None:
            return
        names, vec = vector
        assert len(names) == len(set(names)) == vec.numel()
        out = {k: float(v) for k, v in values.items() if k != "step_time"}
        out.update(zip(names, vec.tolist()))
        self.steps[step] = out


def build(seed: int, device: str, opt_cls, variant: dict):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)).to(device)
    unused = torch.nn.Parameter(torch.randn(4, generator=g).to(device))  # never gets a gradient
    frozen = torch.nn.Parameter(torch.randn(3, generator=g).to(device), requires_grad=False)
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2},
              {"params": list(model[2].parameters()) + [unused, frozen], "lr": 3e-3, "weight_decay": 0.05},
              {"params": []}]
    opt = opt_cls(groups, lr=1e-3, betas=(0.9, 0.95), **variant)
    return model, opt, g


def reference_step(model, opt, g, device, accumulate: int, clip: float | None, names=None):
    opt.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        x = torch.randn(8, 5, generator=g).to(device)
        (model(x).pow(2).mean() / accumulate).backward()
    params = [p for grp in opt.param_groups for p in grp["params"]]
    pre_clip = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    ref = Reference(opt, names)
    ref.before(pre_clip)
    opt.step()
    return ref.after()


def close(got: dict, ref: dict):
    assert set(got) == set(ref), (set(got) ^ set(ref))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=2e-5, abs=1e-9, nan_ok=True), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("accumulate,clip", [(1, None), (3, 0.01)], ids=["plain", "accum3-clip"])
def test_probe_matches_float64_reference(device, opt_cls, variant, accumulate, clip):
    model, opt, g = build(seed=7, device=device, opt_cls=opt_cls, variant=variant)
    cap = Capture()
    OptimizerProbe(opt, cap)
    refs = [reference_step(model, opt, g, device, accumulate, clip) for _ in range(5)]
    assert sorted(cap.steps) == list(range(5))  # only real optimizer steps count
    for step, ref in enumerate(refs):
        close(cap.steps[step], ref)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(1, 40), lr=st.floats(1e-5, 1.0),
       wd=st.sampled_from([0.0, 0.01, 0.3]), steps=st.integers(1, 4), fused=st.booleans())
def test_probe_on_random_models(seed, width, lr, wd, steps, fused):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, fused=fused)
    cap = Capture()
    OptimizerProbe(opt, cap)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ref = reference_step(model, opt, g, "cpu", 1, None)
        close(cap.steps[step], ref)


def test_sampling_every_n_computes_nothing_on_other_steps():
    model, opt, g = build(seed=1, device="cpu", opt_cls=torch.optim.AdamW, variant={})
    cap = Capture()
    probe = OptimizerProbe(opt, cap, every=3)
    for step in range(7):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=g)).sum().backward()
        if step % 3:
            assert probe._backward_norms == {}  # no reduction was launched for an unsampled step
        opt.step()
    assert sorted(cap.steps) == [0, 3, 6]
    assert probe.steps == 7


def test_non_finite_and_zero_gradients():
    p = torch.nn.Parameter(torch.ones(4))
    q = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p, q], lr=0.1)
    cap = Capture()
    OptimizerProbe(opt, cap)
    p.grad, q.grad = torch.zeros(4), torch.zeros(2)
    opt.step()
    assert cap.steps[0]["grad_norm"] == 0.0 and cap.steps[0]["update_norm"] == 0.0
    assert cap.steps[0]["exp_avg_norm"] == 0.0
    p.grad, q.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0]), torch.tensor([float("inf"), 1.0])
    opt.step()
    assert math.isnan(cap.steps[1]["grad_norm"])  # NaN wins over Inf in the L2 norm
    q.grad = None
    p.grad = torch.tensor([float("inf"), 0.0, 0.0, 0.0])
    opt.step()
    assert cap.steps[2]["grad_norm"] == math.inf


def test_param_group_added_mid_run_and_set_to_none():
    model, opt, g = build(seed=3, device="cpu", opt_cls=torch.optim.Adam, variant={})
    cap = Capture()
    OptimizerProbe(opt, cap)
    reference_step(model, opt, g, "cpu", 1, None)
    extra = torch.nn.Linear(5, 5)
    opt.add_param_group({"params": list(extra.parameters()), "lr": 1e-2})
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(4, 5, generator=g)
        (model(extra(x)).pow(2).mean()).backward()
        params = [p for grp in opt.param_groups for p in grp["params"]]
        grad_norm = n64(p.grad for p in params if p.grad is not None)
        opt.step()
        assert cap.steps[step]["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
        assert cap.steps[step]["exp_avg_norm"] == pytest.approx(
            n64(opt.state[p]["exp_avg"] for p in params if p in opt.state), rel=1e-5)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
], ids=["SGD-momentum", "RMSprop", "Adagrad", "NAdam", "Adafactor"])
def test_other_optimizers_get_the_generic_series(make):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = make(model.parameters())
    cap = Capture()
    OptimizerProbe(opt, cap)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(3, 4, generator=g)).pow(2).sum().backward()
        ref = Reference(opt)
        ref.before({id(p): p.grad.clone() for p in model.parameters()})
        opt.step()
        close(cap.steps[step], ref.after())
    assert "update_rms" not in cap.steps[0] and "grad_norm" in cap.steps[0]


def test_a_probe_failure_never_reaches_training(monkeypatch, caplog):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    cap = Capture()
    probe = OptimizerProbe(opt, cap)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "_foreach_norm", broken)  # a fault we cannot cause otherwise
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()  # must not raise
    assert probe.steps == 3 and cap.steps == {}
    assert "optimizer probe disabled" in caplog.text
    probe.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("as_keyword", [False, True])
def test_step_with_a_closure_is_measured_after_the_closure(as_keyword):
    """opt.step(closure): the probe must see this step's gradients, not the previous batch's."""
    model, opt, g = build(seed=5, device="cpu", opt_cls=torch.optim.AdamW, variant={})
    cap = Capture()
    OptimizerProbe(opt, cap)
    calls = []
    for step in range(3):
        x = torch.randn(8, 5, generator=g)
        grads = {}

        def closure():
            calls.append(step)
            opt.zero_grad(set_to_none=True)
            loss = model(x).pow(2).mean()
            loss.backward()
            grads.update({id(p): p.grad.detach().clone() for p in model.parameters()})
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        loss = opt.step(closure=closure) if as_keyword else opt.step(closure)
        assert isinstance(loss, torch.Tensor)  # the step still returns the closure's result
        assert cap.steps[step]["grad_norm"] == pytest.approx(n64(grads.values()), rel=1e-5)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert calls == [0, 1, 2]  # the closure ran exactly once per step


def test_a_resumed_optimizer_goes_on_numbering_its_steps():
    model, opt, g = build(seed=2, device="cpu", opt_cls=torch.optim.AdamW, variant={})
    for _ in range(3):
        reference_step(model, opt, g, "cpu", 1, None)
    restored = torch.optim.AdamW(opt.param_groups)  # a fresh optimizer loaded from a checkpoint
    restored.load_state_dict(opt.state_dict())
    cap = Capture()
    OptimizerProbe(restored, cap)
    reference_step(model, restored, g, "cpu", 1, None)
    assert sorted(cap.every_step) == [3]
    cap2 = Capture()
    OptimizerProbe(restored, cap2, start_step=100)
    reference_step(model, restored, g, "cpu", 1, None)
    assert 100 in cap2.every_step
