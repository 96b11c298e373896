"""End to end: a real training loop with the SDK, the real collector under uvicorn, SQLite and PostgreSQL.

The test recomputes every canonical statistic in float64 from the parameters before and after each
step, the gradients as backward left them (before clipping) and the optimizer's state, and checks
that the REST API returns exactly those values for every step, that a NaN arrives as NaN, and that
the alert was stored and the webhook delivered.
"""

from __future__ import annotations

import math

import pytest
import torch

import optiscope

from conftest import wait_until

STEPS = 40
NAN_STEP = STEPS  # one more logged step whose loss is NaN


def _norm64(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def _train_and_reference(run, clip: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    run.watch(opt, model, every=1)
    ref = {}
    for step in range(STEPS):
        x = torch.randn(16, 6)
        y = x[:, :1] * 2 - x[:, 1:2]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _norm64(p.grad for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # the probe must report the pre-clip norm
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.step()
        after = [p.detach().double() for p in model.parameters()]
        update = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(after, before)))
        ref[step] = {
            "loss": float(loss.detach()),
            "lr": 3e-2,
            "grad_norm": grad_norm,
            "param_norm": _norm64(after),
            "update_norm": update,
            "update_ratio": update / _norm64(before),
            "exp_avg_norm": _norm64(opt.state[p]["exp_avg"] for p in model.parameters()),
            "exp_avg_sq_norm": _norm64(opt.state[p]["exp_avg_sq"] for p in model.parameters()),
        }
        run.log({"loss": loss})  # a 0-d tensor: read on the exporter thread
    run.log({"loss": float("nan"), "extreme": float("inf"), "extreme_neg": -math.inf}, step=NAN_STEP)
    return ref


def test_training_run_end_to_end(collector, receiver):
    run = optiscope.init(project="e2e", name="adamw-clip", url=collector.url, config={"lr": 3e-2, "clip": 0.05})
    ref = _train_and_reference(run, clip=0.05)
    assert run.finish(timeout=30), run.counters
    assert run.counters["dropped"] == 0

    detail = collector.api(f"/runs/{run.id}")
    assert detail["project"] == "e2e" and detail["name"] == "adamw-clip" and detail["status"] == "finished"
    assert detail["config"] == {"lr": 3e-2, "clip": 0.05}
    assert detail["url"].endswith(f"/api/v1/runs/{run.id}")
    assert any(r["id"] == run.id for r in collector.api("/runs?project=e2e")["runs"])

    names = {s["name"] for s in collector.api(f"/runs/{run.id}/series")["series"]}
    canonical = (
        "loss",
        "lr",
        "grad_norm",
        "param_norm",
        "update_norm",
        "update_ratio",
        "exp_avg_norm",
        "exp_avg_sq_norm",
    )
    assert set(canonical) | {"extreme", "extreme_neg", "update_rms", "grad_norm/param/0.weight"} <= names
    assert {n.split("/")[0] for n in names} <= {n.split("/")[0] for n in optiscope.CATALOG} | {"extreme", "extreme_neg"}

    for name in canonical:
        data = collector.api(f"/runs/{run.id}/series/{name}")
        expected_steps = list(range(STEPS)) + ([NAN_STEP] if name == "loss" else [])
        assert data["steps"] == expected_steps, name
        assert not data["truncated"]
        for step, value in zip(data["steps"][:STEPS], data["values"]):
            assert value == pytest.approx(ref[step][name], rel=2e-5, abs=1e-12), (name, step)
    # The clip really clipped, so grad_norm being pre-clip is a real check.
    assert all(ref[s]["grad_norm"] > 0.05 * 1.5 for s in ref)

    loss = collector.api(f"/runs/{run.id}/series/loss")
    assert loss["values"][-1] == "NaN"
    assert collector.api(f"/runs/{run.id}/series/extreme")["values"] == ["Infinity"]
    assert collector.api(f"/runs/{run.id}/series/extreme_neg")["values"] == ["-Infinity"]

    alerts = collector.api(f"/runs/{run.id}/alerts")["alerts"]
    assert [(a["rule"], a["series"], a["step"], a["state"], a["value"]) for a in alerts] == [
        ("non_finite", "loss", NAN_STEP, "firing", "NaN")
    ]
    assert any(a["run_id"] == run.id for a in collector.api("/alerts")["alerts"])

    wait_until(lambda: receiver.events, what="webhook delivery")
    (event,) = receiver.events
    assert event["type"] == "alert.firing"
    assert event["alert"]["rule"] == "non_finite" and event["alert"]["value"] == "NaN"
    assert event["run"]["id"] == run.id and event["run"]["url"] == detail["url"]

    metrics = collector.metrics()
    assert f'optiscope_run_loss{{project="e2e",run_id="{run.id}",run_name="adamw-clip"}} NaN' in metrics
    assert f'optiscope_run_alerts_firing{{project="e2e",run_id="{run.id}",run_name="adamw-clip"}} 1.0' in metrics
