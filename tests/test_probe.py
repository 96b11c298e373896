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

from optiscope.probe import OptimizerProbe, blocks, stats
from optiscope.probe.native import Native

from conftest import missing
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
    VARIANTS += [
        pytest.param(dict(capturable=True, foreach=True), id="capturable-foreach"),
        pytest.param(dict(capturable=True, foreach=False), id="capturable-for-loop"),
    ]


# The probe walks memory in blocks: small tensors packed together, large ones cut into chunks.
# The models here are tiny, so tiny layouts make them take every path: all packed (the default),
# every tensor cut into chunks of 5 coordinates, and a mix of both. The mix also takes the path
# of optimizers that keep their step count on an accelerator (capturable, fused), where the
# probe computes bias corrections as device tensors instead of reading the count.
LAYOUTS = [
    pytest.param((None, False), id="packed"),
    pytest.param((blocks.Layout(5, 1), False), id="chunked"),
    pytest.param((blocks.Layout(16, 8), True), id="mixed-tensor-steps"),
]


@pytest.fixture(params=LAYOUTS)
def layout(request, monkeypatch):
    lay, tensor_steps = request.param
    if lay is not None:
        monkeypatch.setattr(blocks, "layout_for", lambda device: lay)
    if tensor_steps:
        monkeypatch.setattr(stats, "_scalar_step", lambda step: torch.as_tensor(step, dtype=torch.float64))
    return lay


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
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2},
        {"params": list(model[2].parameters()) + [unused, frozen], "lr": 3e-3, "weight_decay": 0.05},
        {"params": []},
    ]
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
    assert set(got) == set(ref), set(got) ^ set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=2e-5, abs=1e-9, nan_ok=True), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("accumulate,clip", [(1, None), (3, 0.01)], ids=["plain", "accum3-clip"])
def test_probe_matches_float64_reference(device, opt_cls, variant, accumulate, clip, layout):
    """The blocks (eager, and compiled where a pack's rows allow it) in every layout."""
    model, opt, g = build(seed=7, device=device, opt_cls=opt_cls, variant=variant)
    cap = Capture()
    OptimizerProbe(opt, cap, native=False)
    refs = [reference_step(model, opt, g, device, accumulate, clip) for _ in range(5)]
    assert sorted(cap.steps) == list(range(5))  # only real optimizer steps count
    for step, ref in enumerate(refs):
        close(cap.steps[step], ref)


@pytest.fixture(scope="module")
def native_built():
    """The native walks, built once (a C compiler is a real dependency of this path)."""
    if not (Native().ready() or Native.wait(timeout=300)):
        missing("the native statistics kernel did not build (no C compiler with OpenMP?)")


class NativeCalls:
    """Counts the native walks a probe makes (a spy around the real calls)."""

    def __init__(self, monkeypatch):
        self.pre = self.post = 0
        real_pre, real_post = Native.pre, Native.post

        def pre(*a):
            self.pre += 1
            return real_pre(*a)

        def post(*a):
            self.post += 1
            return real_post(*a)

        monkeypatch.setattr(Native, "pre", staticmethod(pre))
        monkeypatch.setattr(Native, "post", staticmethod(post))


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("accumulate,clip", [(1, None), (3, 0.01)], ids=["plain", "accum3-clip"])
def test_native_walks_match_float64_reference(opt_cls, variant, accumulate, clip, native_built, monkeypatch):
    """On CPU, once built, both walks are one native call each, from the first sampled step."""
    calls = NativeCalls(monkeypatch)
    model, opt, g = build(seed=7, device="cpu", opt_cls=opt_cls, variant=variant)
    cap = Capture()
    OptimizerProbe(opt, cap)
    refs = [reference_step(model, opt, g, "cpu", accumulate, clip) for _ in range(5)]
    assert (calls.pre, calls.post) == (5, 5)
    for step, ref in enumerate(refs):
        close(cap.steps[step], ref)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    ],
    ids=["SGD-momentum", "AdamW-amsgrad"],
)
def test_native_walks_cut_large_tensors_into_items(make, native_built, monkeypatch):
    """Tensors longer than one work item (and not a multiple of its length or of a row) are cut
    into several; the sums over the items still match the reference, NaN and Inf included."""
    from optiscope.probe.native import ITEM

    calls = NativeCalls(monkeypatch)
    torch.manual_seed(0)
    width = 3 * ITEM // 5 + 11
    model = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))
    assert model[0].weight.numel() > 2 * ITEM and model[0].weight.numel() % 1024
    opt = make(model.parameters())
    cap = Capture()
    OptimizerProbe(opt, cap)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        ref = reference_step(model, opt, g, "cpu", 1, None)
        close(cap.steps[step], ref)
    assert calls.post == 3


def test_native_walks_keep_non_finite_values(native_built, monkeypatch):
    """NaN and Inf in gradients reach the sums as they would in torch (a NaN v stays NaN)."""
    calls = NativeCalls(monkeypatch)
    p = torch.nn.Parameter(torch.ones(5000))
    opt = torch.optim.Adam([p], lr=0.1)
    cap = Capture()
    OptimizerProbe(opt, cap)
    p.grad = torch.ones(5000)
    opt.step()
    p.grad = torch.ones(5000)
    p.grad[17] = math.inf
    opt.step()
    p.grad = torch.ones(5000)
    p.grad[4000] = math.nan
    opt.step()
    p.grad = torch.ones(5000)  # finite again, but v_{t-1} now holds a NaN
    opt.step()
    assert calls.post == 4
    assert cap.steps[1]["grad_norm"] == math.inf and cap.steps[1]["exp_avg_sq_norm"] == math.inf
    assert math.isnan(cap.steps[2]["grad_norm"]) and math.isnan(cap.steps[2]["v_underestimation"])
    assert math.isnan(cap.steps[2]["update_rms"])
    assert cap.steps[3]["grad_norm"] == pytest.approx(math.sqrt(5000))
    assert math.isnan(cap.steps[3]["v_underestimation"])  # clamp_min keeps a NaN v, as in torch


def test_tensors_the_native_walks_cannot_read_take_the_other_paths(native_built, monkeypatch):
    """float64 and bfloat16 parameters, and non-contiguous ones, are walked by the blocks."""
    calls = NativeCalls(monkeypatch)
    for dtype, transpose in ((torch.float64, False), (torch.bfloat16, False), (torch.float32, True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
        if transpose:
            w = model[0].weight
            model[0].weight = torch.nn.Parameter(w.detach().t().contiguous().t())
            assert not model[0].weight.is_contiguous()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cap = Capture()
        OptimizerProbe(opt, cap)
        g = torch.Generator().manual_seed(1)
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            x = torch.randn(4, 5, generator=g).to(dtype)
            model(x).pow(2).mean().backward()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            opt.step()
            assert cap.steps[step]["grad_norm"] == pytest.approx(
                n64(grads), rel=1e-2 if dtype is torch.bfloat16 else 1e-5
            )
    assert (calls.pre, calls.post) == (0, 0)


def test_without_a_c_compiler_the_other_paths_serve(monkeypatch, caplog):
    """A machine without a C compiler: the build fails once, says so, and the probe goes on
    with the eager blocks and the compiled kernels, with the same numbers."""
    from optiscope.probe import native

    caplog.set_level("INFO", logger="optiscope")
    monkeypatch.setattr(native, "_S", native._State())  # this process's build, as if never tried
    monkeypatch.setenv("CC", "/nonexistent/cc")
    calls = NativeCalls(monkeypatch)
    model, opt, g = build(seed=4, device="cpu", opt_cls=torch.optim.AdamW, variant={})
    cap = Capture()
    probe = OptimizerProbe(opt, cap)
    ref = reference_step(model, opt, g, "cpu", 1, None)
    assert Native.wait(timeout=60) is False and not probe.native.building()
    refs = [ref] + [reference_step(model, opt, g, "cpu", 1, None) for _ in range(2)]
    for step, ref in enumerate(refs):
        close(cap.steps[step], ref)
    assert (calls.pre, calls.post) == (0, 0)
    assert "native statistics kernel unavailable" in caplog.text


def test_adam_state_the_native_walk_cannot_read_leaves_the_generic_series(native_built, monkeypatch):
    """A moment laid out unlike its parameter (torch.optim never does this) is not read natively:
    that step reports the generic series, exactly, and training goes on."""
    calls = NativeCalls(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cap = Capture()
    probe = OptimizerProbe(opt, cap)
    g = torch.Generator().manual_seed(1)
    model(torch.randn(3, 6, generator=g)).pow(2).sum().backward()
    opt.step()
    st = opt.state[model.weight]
    st["exp_avg"] = st["exp_avg"].t().contiguous().t()  # same values, transposed layout
    assert not st["exp_avg"].is_contiguous()
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(3, 6, generator=g)).pow(2).sum().backward()
        ref = Reference(opt)
        ref.before({id(p): p.grad.clone() for p in model.parameters()})
        opt.step()
        want = ref.after()
        got = cap.steps[step]
        assert "update_rms" not in got and not probe._failed
        for k in ("grad_norm", "update_norm", "param_norm", "exp_avg_norm", "exp_avg_sq_norm"):
            assert got[k] == pytest.approx(want[k], rel=2e-5), k
    assert calls.post == 3


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.integers(1, 40),
    lr=st.floats(1e-5, 1.0),
    wd=st.sampled_from([0.0, 0.01, 0.3]),
    steps=st.integers(1, 4),
    fused=st.booleans(),
    chunk=st.sampled_from([None, 3, 64]),
    pack_below=st.integers(1, 50),
    native=st.booleans(),
)
def test_probe_on_random_models(seed, width, lr, wd, steps, fused, chunk, pack_below, native):
    torch.manual_seed(seed)
    lay = None if chunk is None else blocks.Layout(chunk, pack_below)
    original = blocks.layout_for
    blocks.layout_for = (lambda device: lay) if lay else original  # hypothesis runs without fixtures
    try:
        _random_model_steps(seed, width, lr, wd, steps, fused, native)
    finally:
        blocks.layout_for = original


def _random_model_steps(seed, width, lr, wd, steps, fused, native):
    model = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, fused=fused)
    cap = Capture()
    OptimizerProbe(opt, cap, native=native)  # native: once built (see native_built), else the blocks
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ref = reference_step(model, opt, g, "cpu", 1, None)
        close(cap.steps[step], ref)


def test_sampling_every_n_computes_nothing_on_other_steps():
    model, opt, g = build(seed=1, device="cpu", opt_cls=torch.optim.AdamW, variant={})
    cap = Capture()
    probe = OptimizerProbe(opt, cap, every=3, vitals=False)
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
            n64(opt.state[p]["exp_avg"] for p in params if p in opt.state), rel=1e-5
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        lambda ps: torch.optim.NAdam(ps, lr=1e-2),
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    ],
    ids=["SGD-momentum", "RMSprop", "Adagrad", "NAdam", "Adafactor"],
)
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

    monkeypatch.setattr(torch, "dot", broken)  # a fault we cannot cause otherwise
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

        def closure(step=step, x=x, grads=grads):  # bound: called within this iteration
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


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clip"])
def test_grad_scaler_grad_norm_is_of_the_unscaled_gradients(clip):
    """Backward leaves gradients multiplied by the loss scale; grad_norm must be the norm of the
    true gradients (measured after unscale_, before clipping), grad_norm_clipped what the step used."""
    from optiscope.probe.amp import ScalerProbe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    cap = Capture()
    probe = OptimizerProbe(opt, cap)
    amp = ScalerProbe(scaler, probe)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 6)).pow(2).sum()).backward()
        scaler.unscale_(opt)
        true = n64(p.grad for p in model.parameters())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        stepped = n64(p.grad for p in model.parameters())
        scaler.step(opt)
        scaler.update()
        assert cap.steps[step]["grad_norm"] == pytest.approx(true, rel=1e-6)
        assert cap.steps[step]["grad_norm_clipped"] == pytest.approx(stepped, rel=1e-6)
        if clip is not None:
            assert stepped == pytest.approx(clip, rel=1e-4) and clip < true  # it really clipped
    amp.close()
    assert "unscale_" not in scaler.__dict__


def _backward_ops(model, x) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    loss = model(x).pow(2).mean()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    return [e.name for e in prof.events()]


def test_gradients_are_measured_in_backward_only_while_something_changes_them():
    """Without clipping, backward's gradients are the ones the step uses: after the first sampled
    step the probe stops reducing them in backward (the post-step walk has ||g||^2 anyway). Once
    clipping appears, that step's grad_norm is unknown and left out; every later sampled step
    measures in backward again and reports the pre-clip norm."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bare = _backward_ops(model, torch.randn(4, 6))  # the backward pass's own operators
    opt.zero_grad(set_to_none=True)
    cap = Capture()
    OptimizerProbe(opt, cap, vitals=False)
    true = []
    for step in range(6):
        x = torch.randn(4, 6)
        ops = _backward_ops(model, x)
        extra = len([o for o in ops if o == "aten::dot"]) - len([o for o in bare if o == "aten::dot"])
        assert extra == (len(list(model.parameters())) if step in (0, 4, 5) else 0), (step, extra)
        true.append(n64(p.grad for p in model.parameters()))
        if step >= 3:  # clipping from step 3 on
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for step in range(6):
        if step == 3:  # the first clipped step: its pre-clip norm was not measured
            assert "grad_norm" not in cap.steps[step] and "grad_norm_clipped" in cap.steps[step]
            assert not any(k.startswith("grad_norm/param/") for k in cap.steps[step])
        else:
            assert cap.steps[step]["grad_norm"] == pytest.approx(true[step], rel=1e-6), step
    assert cap.steps[5]["grad_norm_clipped"] == pytest.approx(0.01, rel=1e-4)


def _ops_of_a_step(model, opt, x) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
    return sorted(e.name for e in prof.events())


def test_an_unsampled_step_runs_no_operation_at_all():
    """The probe's hooks on a step they do not sample launch nothing: the operator trace of the
    step is the same as without the probe (so there is nothing that could sync, on any device)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    for _ in range(2):
        _ops_of_a_step(model, opt, x)
    bare = _ops_of_a_step(model, opt, x)
    probe = OptimizerProbe(opt, lambda *a: None, every=1000, vitals=False)
    probe.steps = 1  # past the sampled step 0
    watched = _ops_of_a_step(model, opt, x)
    probe.close()
    assert watched == bare
    # and the same check can fail: a sampled step does launch the probe's reductions
    probe = OptimizerProbe(opt, lambda *a: None, every=1)
    sampled = _ops_of_a_step(model, opt, x)
    probe.close()
    assert "aten::dot" in sampled and "aten::dot" not in bare


if torch.cuda.is_available():  # generated only where a GPU exists: CI has none, a lent one runs it

    @pytest.mark.parametrize(
        "variant",
        [dict(foreach=True), dict(fused=True), dict(capturable=True, foreach=True)],
        ids=["foreach", "fused", "capturable"],
    )
    def test_no_host_sync_on_unsampled_steps_cuda(variant):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **variant)
        x = torch.randn(32, 64, device="cuda")
        sink = []
        probe = OptimizerProbe(opt, lambda s, h, v: sink.append(v), every=4)
        for step in range(8):
            sampled = step % 4 == 0
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0 if sampled else "error")
            try:
                opt.zero_grad(set_to_none=True)
                model(x).pow(2).mean().backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert [v is not None for v in sink] == [True, False, False, False] * 2
        probe.close()


def _compiled_regions(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
    ids=["AdamW", "Adam-amsgrad-foreach", "AdamW-fused", "SGD-momentum"],
)
def test_fused_kernels_match_the_reference(make):
    """Large tensors go through compiled kernels once they are ready (compiled in the background,
    the eager blocks serve meanwhile); both must agree with the float64 reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4000), torch.nn.GELU(), torch.nn.Linear(4000, 3))
    assert model[0].weight.numel() >= blocks_min_fused()
    # The large weight: for Adam one kernel before the step (v-underestimation needs v_{t-1}) and
    # one after; otherwise the pre-step work is the snapshot copy alone.
    _compiled_steps_match_the_reference(model, make)


def _compiled_steps_match_the_reference(model, make) -> None:
    """Steps before, while and after the kernels compile agree with the reference; once compiled,
    a step runs one kernel per walk with work in it (two for Adam, one otherwise). These are the
    torch.compile kernels that serve accelerators: native=False keeps the CPU's native walks out."""
    opt = make(model.parameters())
    cap = Capture()
    probe = OptimizerProbe(opt, cap, native=False)
    g = torch.Generator().manual_seed(1)
    refs = [reference_step(model, opt, g, "cpu", 1, 0.5)]  # step 0: compilation starts
    for _ in range(2):  # step 1 asks for the kernels that need Adam's state, compiled now too
        assert probe.kernels.wait(timeout=600), "the fused kernels did not compile"
        refs.append(reference_step(model, opt, g, "cpu", 1, 0.5))
    assert probe.kernels.wait(timeout=600)
    ref, regions = _compiled_regions(lambda: reference_step(model, opt, g, "cpu", 2, 0.5))
    refs.append(ref)
    assert regions == (2 if isinstance(opt, torch.optim.Adam) else 1)
    for step, ref in enumerate(refs):
        close(cap.steps[step], ref)
    probe.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
    ids=["AdamW", "Adam-amsgrad-foreach", "SGD-momentum"],
)
def test_packed_small_tensors_go_through_row_kernels(make):
    """Small tensors whose lengths share a divisor (64 here) are one (rows, 64) matrix: one
    compiled kernel per walk for the whole pack, per-tensor sums equal to the reference."""
    from optiscope.probe.blocks import plan

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 64)
    )
    torch.nn.init.normal_(model[1].bias)  # a zero bias has no update ratio to compare
    (pack,) = plan([p.reshape(-1) for p in model.parameters()])
    assert pack.packed and pack.width() == 64
    _compiled_steps_match_the_reference(model, make)


def blocks_min_fused() -> int:
    from optiscope.probe.fused import MIN_NUMEL

    return MIN_NUMEL


def test_fused_kernels_can_be_turned_off():
    model = torch.nn.Linear(200, 120)
    opt = torch.optim.AdamW(model.parameters())
    probe = OptimizerProbe(opt, Capture(), fused=False)
    for _ in range(2):
        model(torch.randn(4, 200)).sum().backward()
        _, regions = _compiled_regions(opt.step)
        assert regions == 0
    assert not probe.kernels.enabled and not probe.kernels.ready("post_adam_v", [model.weight] * 5)


@given(
    st.lists(
        st.lists(st.sampled_from([0.0, 1e-12, 0.5, 2.0, 3.0, math.inf, math.nan]), min_size=1, max_size=9),
        min_size=1,
        max_size=8,
    )
)
def test_batched_medians_are_torch_median(samples):
    """The per-tensor epsilon-headroom medians come from one kthvalue per sample length; each must
    be exactly torch.median of its sample (the lower middle value, NaN when the sample has one)."""
    from optiscope.probe.stats import medians

    tensors = [torch.tensor(x, dtype=torch.float32) for x in samples]
    got = medians(tensors, torch.device("cpu")).tolist()
    want = [float(t.median()) for t in tensors]
    assert [math.isnan(x) for x in got] == [math.isnan(x) for x in want]
    assert [x for x in got if not math.isnan(x)] == [x for x in want if not math.isnan(x)]


def test_vitals_measure_the_pre_clip_gradient_norm_on_every_step_without_a_sync():
    """With vitals (the default), every step's record carries grad_norm, the norm of the gradients
    as backward left them (before clipping), as a device tensor the exporter reads later: the only
    operators added to an unsampled step are the per-parameter reductions and their stack, and no
    copy to the host (aten::item / _local_scalar_dense) runs on the training thread."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6)
    for _ in range(2):
        _ops_of_a_step(model, opt, x)
    bare = _ops_of_a_step(model, opt, x)
    cap = Capture()
    probe = OptimizerProbe(opt, cap, every=1000)
    probe.steps = 1
    watched = _ops_of_a_step(model, opt, x)
    added = list(watched)
    for op in bare:
        added.remove(op)
    assert added and not any(o in ("aten::item", "aten::_local_scalar_dense") for o in added), added
    assert isinstance(cap.every_step[1]["grad_norm"], torch.Tensor)
    probe.close()
    cap = Capture()
    probe = OptimizerProbe(opt, cap, every=4, start_step=0)
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 2)).backward()
        true = n64(p.grad for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the record must say pre-clip
        opt.step()
        got = cap.steps[step]["grad_norm"] if step in cap.steps else float(cap.every_step[step]["grad_norm"])
        assert got == pytest.approx(true, rel=1e-6), step
    probe.close()
    # every step sampled, clipping first appearing at step 2 after sampled steps without it: the
    # per-tensor norms of that step are unknown, but the vitals measured the global one in backward
    cap = Capture()
    OptimizerProbe(opt, cap, every=1, start_step=0)
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 2)).backward()
        true = n64(p.grad for p in model.parameters())
        if step >= 2:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        assert cap.steps[step]["grad_norm"] == pytest.approx(true, rel=1e-6), step
    assert not any(k.startswith("grad_norm/param/") for k in cap.steps[2])
