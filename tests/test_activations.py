"""Activation headroom: forward hooks on sampled steps, checked against a direct recomputation."""

from __future__ import annotations

import math

import pytest
import torch

import optiscope
from optiscope.probe import OptimizerProbe
from optiscope.probe.activations import ActivationProbe
from optiscope.probe.native import Native

from conftest import free_port, missing


class Half(torch.nn.Module):
    """An fp16 activation buffer (like attention scores kept in half precision)."""

    def forward(self, x):
        return x.to(torch.float16)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scores = Half()

    def forward(self, x, scale=1.0):
        return self.scores(self.lin(x) * scale).float().sum()


@pytest.fixture(params=["native", "aminmax"])
def reader(request, monkeypatch):
    """Float32 CPU outputs are read by the native kernel once it is built, others (and all of
    them without it) by torch.aminmax: every test here runs both ways. Yields the number of
    native reads so far."""
    calls = [0]
    if request.param == "native":
        if not (Native().ready() or Native.wait(timeout=300)):
            missing("the native statistics kernel did not build (no C compiler with OpenMP?)")
        real = Native.absmax

        def spy(t):
            calls[0] += 1
            return real(t)

        monkeypatch.setattr(Native, "absmax", staticmethod(spy))
    monkeypatch.setitem(READER, "native", request.param == "native")
    yield calls
    if request.param == "native":
        assert calls[0] > 0  # the native path really ran


READER = {"native": False}


def attach(model, every=1, modules=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = {}

    def emit(step, host, vector):
        if vector is not None:
            seen[step] = dict(zip(vector[0], vector[1].tolist()))

    probe = OptimizerProbe(opt, emit, every=every)
    act = ActivationProbe(
        model, probe.sampling_next, modules=modules, native=probe.native if READER["native"] else None
    )
    probe.contributors.append(act)
    return opt, seen, act


def test_headroom_matches_direct_recomputation_over_micro_batches(reader):
    torch.manual_seed(0)
    model = Net()
    opt, seen, _ = attach(model)
    xs = [torch.randn(3, 4) for _ in range(2)]
    with torch.no_grad():
        expected_lin = max(float(model.lin(x).abs().max()) for x in xs)
        expected_half = max(float((model.lin(x) * 100).to(torch.float16).abs().max()) for x in xs)
    for x in xs:  # two micro-batches, one optimizer step: the running max counts
        model(x, scale=100.0).backward()
    opt.step()
    got = seen[0]
    assert got["act_absmax/module/lin"] == pytest.approx(expected_lin, rel=1e-6)
    assert got["act_absmax/module/scores"] == pytest.approx(expected_half, rel=1e-6)
    assert got["act_headroom_bits/module/scores"] == pytest.approx(math.log2(65504 / expected_half), rel=1e-9)
    assert got["act_headroom_bits/module/lin"] == pytest.approx(
        math.log2(torch.finfo(torch.float32).max / expected_lin), rel=1e-9
    )
    assert got["act_headroom_bits"] == min(got["act_headroom_bits/module/scores"], got["act_headroom_bits/module/lin"])


def test_overflow_nan_eval_and_unsampled_steps(reader):
    torch.manual_seed(0)
    model = Net()
    opt, seen, act = attach(model, every=2)
    model(torch.randn(2, 4), scale=1e6).backward()  # fp16 overflows to inf
    opt.step()
    assert seen[0]["act_headroom_bits/module/scores"] == -math.inf
    assert seen[0]["act_headroom_bits"] == -math.inf
    model(torch.randn(2, 4)).backward()  # step 1 is not sampled: no reduction runs
    assert act._seen == []
    opt.step()
    with torch.no_grad():
        model(torch.full((2, 4), float("nan")))  # evaluation: never recorded
    assert act._seen == []
    model(torch.full((2, 4), float("nan"))).backward()  # step 2 is sampled: NaN is the signal
    opt.step()
    assert math.isnan(seen[2]["act_absmax/module/lin"]) and math.isnan(seen[2]["act_headroom_bits"])
    assert sorted(seen) == [0, 2]


def test_chosen_modules_and_bad_names():
    model = Net()
    opt, seen, _ = attach(model, modules=["scores"])
    model(torch.randn(2, 4)).backward()
    opt.step()
    assert {k for k in seen[0] if k.startswith("act_")} == {
        "act_absmax/module/scores",
        "act_headroom_bits/module/scores",
        "act_headroom_bits",
    }
    with pytest.raises(ValueError):
        ActivationProbe(model, lambda: True, modules=["nope"])
    # through the SDK, a bad module name is a warning, never an exception into training
    run = optiscope.init(project="act", url=f"http://127.0.0.1:{free_port()}")
    run.watch(torch.optim.SGD(model.parameters(), lr=0.1), model, activations=["nope"])
    run.finish(timeout=0.1)


def test_grad_scaler_loss_scale_and_skipped_steps():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    records = {}
    run = optiscope.init(project="amp", url=f"http://127.0.0.1:{free_port()}")
    run._emit = lambda step, host, vector: records.__setitem__(step, dict(host))  # capture what the probe emits
    run.watch(opt, model, every=1, scaler=scaler)
    for it in range(5):
        opt.zero_grad()
        scale = 1e38 if it in (1, 2) else 1.0  # two iterations overflow: GradScaler skips their steps
        scaler.scale(model(torch.ones(2, 3)).sum() * scale).backward()
        scaler.step(opt)
        scaler.update()
    assert sorted(records) == [0, 1, 2]  # three real optimizer steps
    assert [records[s]["skipped_steps"] for s in (0, 1, 2)] == [0.0, 2.0, 2.0]
    assert [float(records[s]["loss_scale"]) for s in (0, 1, 2)] == [1024.0, 256.0, 256.0]
    run.finish(timeout=0.1)
    assert "update" not in scaler.__dict__  # the scaler is left as it was


def test_float64_outputs_beyond_float32_range_keep_their_headroom():
    """A float64 activation of 1e300 is far from float64's ceiling: no false overflow from an
    intermediate float32."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}
    probe = OptimizerProbe(
        opt, lambda step, host, vec: seen.update(dict(zip(vec[0], vec[1].tolist()))) if vec else None
    )
    act = ActivationProbe(model, probe.sampling_next)
    probe.contributors.append(act)
    (model(torch.full((1, 2), 1e300, dtype=torch.float64)) * 0).sum().backward()
    opt.step()
    assert 20 < seen["act_headroom_bits"] < 40  # about 1e300 of 1.8e308: some 27 bits (float32: -inf)
    assert seen["act_absmax/module/0"] > 1e299


def test_vitals_give_the_headroom_of_half_precision_outputs_on_every_step():
    """On steps that are not sampled, only float16/float8 outputs are measured (their ceiling is in
    reach; float32's is not), and the step's record carries their tightest headroom: log2 of the
    ceiling over max |output| over the step's forward passes, -inf once one overflowed."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hosts = {}
    probe = OptimizerProbe(opt, lambda step, host, vector: hosts.__setitem__(step, host), every=100)
    act = ActivationProbe(model, probe.sampling_next, vitals=True)
    probe.contributors.append(act)
    for step in range(3):
        x = torch.randn(2, 4)
        out = (model.lin(x) * 50).detach().to(torch.float16)
        model(x, scale=50).backward()
        opt.step()
        opt.zero_grad()
        if step:
            want = math.log2(65504 / float(out.float().abs().max()))
            assert float(hosts[step]["act_headroom_bits"]) == pytest.approx(want, rel=1e-6)
    model(torch.randn(2, 4), scale=1e6).backward()  # overflows to inf
    opt.step()
    assert float(hosts[3]["act_headroom_bits"]) == -math.inf
    probe.close()
    act.close()
    # vitals off: an unsampled step measures nothing
    probe = OptimizerProbe(opt, lambda step, host, vector: hosts.__setitem__(step, host), every=100, vitals=False)
    act = ActivationProbe(model, probe.sampling_next, vitals=False)
    probe.contributors.append(act)
    probe.steps = 5
    model(torch.randn(2, 4)).backward()
    opt.step()
    assert "act_headroom_bits" not in hosts[5] and "grad_norm" not in hosts[5]
