"""Keras 3 integration (torch backend): real ``model.fit`` runs against the real collector.

A test-side callback records the weights and Adam's state before every batch (and after the last);
from those, and from the batches themselves (``shuffle=False``, so batch k of an epoch is rows
[k * batch_size, (k + 1) * batch_size)), the tests recompute in float64 the loss of every batch and
its gradient (torch autograd on a float64 copy of the model), and from them every series the
callback sends. The REST API must return exactly those values, at exactly the optimizer's steps.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import urllib.error

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported, here and in the integration

import numpy as np
import pytest
import torch

import optiscope

from conftest import missing, wait_until

try:
    import keras
except ImportError:  # pragma: no cover - depends on the environment
    keras = None

pytestmark = [
    # Keras's own, from pythonify_logs on its batch-end worker thread (torch tensors through np.array).
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    # Expected where a variable is meant to get no gradient (the dropped-branch case).
    pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning"),
]

N_ROWS, N_IN, HIDDEN, EPOCHS = 64, 5, 8, 6
ADAM_SERIES = {"grad_norm", "grad_norm_clipped", "exp_avg_norm", "exp_avg_sq_norm", "update_rms"}
GENERIC_SERIES = {"param_norm", "update_norm", "update_ratio"}


@pytest.fixture(scope="module")
def K():
    if keras is None:
        missing("keras is not installed")
    if keras.backend.backend() != "torch":
        missing(f"keras was imported with the {keras.backend.backend()!r} backend before this module")
    from optiscope.integrations import keras as integration

    return integration


# -- data, model and the test-side truth ------------------------------------------------------
def _data(seed=0, y_scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_ROWS, N_IN)).astype("float32")
    y = (np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.3 * rng.normal(size=(N_ROWS, 1))) * y_scale
    return x, y.astype("float32")


class _Gate(keras.layers.Layer if keras else object):
    """Adds a trainable offset while ``active``: switched off, its variable gets no gradient (Keras
    then leaves its Adam moments as they were)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.active = True

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(1,), initializer="zeros", name="offset")

    def call(self, x):
        return x + self.offset if self.active else x


class _DropGate(keras.callbacks.Callback if keras else object):
    def __init__(self, gate, from_epoch: int):
        super().__init__()
        self.gate, self.from_epoch = gate, from_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.gate.active = epoch < self.from_epoch


def _model(optimizer, seed=0, gate=False, cls=None):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((N_IN,)), keras.layers.Dense(HIDDEN, activation="tanh"), keras.layers.Dense(1)]
    model = (cls or keras.Sequential)(layers + ([_Gate()] if gate else []))
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _f64(variable) -> torch.Tensor:
    return variable.value.detach().to("cpu", torch.float64).clone()


class _Recorder(keras.callbacks.Callback if keras else object):
    """The truth, read freely on the host: weights and Adam's state before each batch and after the
    last. Adam's state is found by variable name, not through the lists the integration reads. Like
    the integration it has no batch-end hook, so Keras keeps dispatching batch ends asynchronously."""

    def __init__(self):
        super().__init__()
        self.snaps: list[dict] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.snaps.append(self._snap(batch))

    def on_train_end(self, logs=None):
        self.snaps.append(self._snap(None))

    def _snap(self, batch):
        opt = self.model.optimizer
        inner = getattr(opt, "inner_optimizer", opt)
        names = {v.name: v for v in inner.variables}
        ws = self.model.trainable_weights

        def slot(kind):
            keys = [f"{w.path.replace('/', '_')}_{kind}" for w in ws]
            return [_f64(names[k]) for k in keys] if all(k in names for k in keys) else None

        gate = [layer for layer in self.model.layers if isinstance(layer, _Gate)]
        return {
            "epoch": self.epoch,
            "batch": batch,
            "raw": int(inner._iterations.value.item()),
            "gate": gate[0].active if gate else None,
            "w": [_f64(w) for w in ws],
            "m": slot("momentum"),
            "v": slot("velocity"),
            "vh": slot("velocity_hat"),
        }


def _forward(ws, xb, gate):
    k1, b1, k2, b2 = ws[:4]
    out = torch.tanh(xb @ k1 + b1) @ k2 + b2
    return out + ws[4] if gate else out


def _loss_and_grad(ws, xb, yb, gate):
    """Keras's mse (mean over the batch) and its gradient, in float64 with torch autograd; None for
    a variable the loss does not depend on."""
    ws = [w.clone().requires_grad_(True) for w in ws]
    loss = (_forward(ws, xb, gate) - yb).pow(2).mean()
    grads = torch.autograd.grad(loss, ws, allow_unused=True)
    return float(loss.detach()), [None if g is None else g.detach() for g in grads]


def _norm(ts) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in ts))


def _reference(
    rec: _Recorder,
    x,
    y,
    bs: int,
    *,
    accumulate: int = 1,
    beta1=0.9,
    beta2=0.999,
    eps=1e-7,
    amsgrad=False,
    weight_decay=0.0,
    clip=None,
    lr_at=None,
    adam=True,
):
    """Expected series by optimizer step, from the recorder's snapshots and the batches."""
    x64, y64 = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    snaps = rec.snaps
    batches = []
    for j in range(len(snaps) - 1):
        before, after = snaps[j], snaps[j + 1]
        rows = slice(before["batch"] * bs, min((before["batch"] + 1) * bs, N_ROWS))
        loss, grads = _loss_and_grad(before["w"], x64[rows], y64[rows], before["gate"])
        # A LossScaleOptimizer that skips a step leaves the count where it was.
        stepped = after["raw"] > before["raw"]
        batches.append(
            {
                "raw": before["raw"],
                "loss": loss,
                "grads": grads,
                "n": rows.stop - rows.start,
                "update": stepped and (before["raw"] + 1) % accumulate == 0,
                "before": before,
                "after": after,
            }
        )
    ref: dict[int, dict] = {}
    for b in batches:
        step = b["raw"] // accumulate
        if accumulate > 1:
            window = [c for c in batches if c["raw"] // accumulate == step]
        else:
            window = [b]  # with skipped steps, the last batch at this count is the one that stepped
        entry = {"loss": float(np.mean([c["loss"] for c in window]))}
        if not b["update"]:
            ref.setdefault(step, {}).update(entry)  # replaced by the update batch's entry
            continue
        lr = lr_at(b["raw"])
        entry["lr"] = lr
        before, after = b["before"], b["after"]
        delta = [w0 - w1 for w0, w1 in zip(before["w"], after["w"])]
        entry["param_norm"] = _norm(after["w"])
        entry["update_norm"] = _norm(delta)
        entry["update_ratio"] = entry["update_norm"] / _norm(before["w"])
        if adam:
            # Adam's series cover the variables that got a gradient in the step (Keras steps only those).
            used = [i for i, gi in enumerate(b["grads"]) if gi is not None]
            for i in set(range(len(delta))) - set(used):
                assert float(delta[i].abs().max()) == 0.0  # untouched, as the reference assumes
            g = [sum(c["grads"][i] for c in window) / len(window) for i in used]
            gn = entry["_pre_clip"] = _norm(g)  # not a series: "_" names are never sent
            if clip is not None:
                g = [gi * min(1.0, clip / gn) for gi in g]  # global_clipnorm
            else:
                entry["grad_norm"] = gn
            entry["grad_norm_clipped"] = _norm(g)
            m, v = [after["m"][i] for i in used], [after["v"][i] for i in used]
            entry["exp_avg_norm"] = _norm(m)
            entry["exp_avg_sq_norm"] = _norm(v)
            t = step + 1
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            den = [after["vh"][i] for i in used] if amsgrad else v
            u = [math.sqrt(bc2) / bc1 * mi / (vi.sqrt() + eps) for mi, vi in zip(m, den)]
            entry["update_rms"] = math.sqrt(sum(float(ui.pow(2).sum()) for ui in u) / sum(ui.numel() for ui in u))
            # Ground the u formula in what Keras really did: delta = lr * u (+ lr * wd * w, decoupled).
            expected = [lr * ui + lr * weight_decay * before["w"][i] for ui, i in zip(u, used)]
            err = _norm([delta[i] - e for i, e in zip(used, expected)])
            assert err <= 2e-3 * _norm(delta), (step, err, _norm(delta))
        ref[step] = entry
    return ref, batches


# -- REST helpers ------------------------------------------------------------------------------
def _get_run(collector, run_id: str):
    try:
        return collector.api(f"/runs/{run_id}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _series(collector, run_id: str) -> dict[str, dict[int, float]]:
    # the exporter's own sdk/* counters are not the callback's series
    names = [s["name"] for s in collector.api(f"/runs/{run_id}/series")["series"] if not s["name"].startswith("sdk/")]
    out = {}
    for name in names:
        data = collector.api(f"/runs/{run_id}/series/{name}")
        assert not data["truncated"]
        assert data["steps"] == sorted(set(data["steps"])), name  # one point per step
        out[name] = dict(zip(data["steps"], data["values"]))
    return out


def _check(got: dict[str, dict[int, float]], ref: dict[int, dict], names: set[str], every: int = 1):
    """Every series: the exact step set and the reference value at each step."""
    update_steps = sorted(s for s, e in ref.items() if "lr" in e)
    sampled = [s for s in update_steps if s % every == 0]
    assert set(got) == {"loss", "lr"} | names, sorted(got)
    assert sorted(got["loss"]) == sorted(ref), "loss: one point per optimizer step"
    assert sorted(got["lr"]) == update_steps
    for name in names:
        assert sorted(got[name]) == sampled, name
    for step, entry in ref.items():
        assert got["loss"][step] == pytest.approx(entry["loss"], rel=1e-5), ("loss", step)
        for name, value in entry.items():
            if name != "loss" and step in got.get(name, {}):
                assert got[name][step] == pytest.approx(value, rel=1e-4, abs=1e-12), (name, step)


def _fit(
    K,
    collector,
    optimizer,
    bs,
    *,
    every=1,
    validation=False,
    seed=0,
    y_scale=1.0,
    run=None,
    drop_gate_from=None,
    cls=None,
):
    x, y = _data(seed, y_scale)
    model = _model(optimizer, seed, gate=drop_gate_from is not None, cls=cls)
    rec = _Recorder()
    extra = [_DropGate(model.layers[-1], drop_gate_from)] if drop_gate_from is not None else []
    kwargs = {"run": run} if run is not None else {"project": "keras-it", "name": "fit", "url": collector.url}
    cb = K.OptiscopeCallback(every=every, **kwargs)
    fit_kwargs = {"validation_data": (x[:16], y[:16])} if validation else {}
    model.fit(x, y, batch_size=bs, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[*extra, cb, rec], **fit_kwargs)
    return cb, rec, x, y


@pytest.fixture
def logged(monkeypatch):
    """Every Run.log call: (step, sorted names), to see what was sent before the collector's
    last-write-wins per step hides it."""
    calls: list[tuple[int, tuple[str, ...]]] = []
    original = optiscope.Run.log

    def spy(self, values, step=None):
        calls.append((step, tuple(sorted(values))))
        return original(self, values, step)

    monkeypatch.setattr(optiscope.Run, "log", spy)
    return calls


# -- tests -------------------------------------------------------------------------------------
SCHEDULE = dict(initial_learning_rate=0.02, decay_steps=5, decay_rate=0.5)

CASES = {
    # name: (optimizer factory, batch size, reference options)
    "adam-schedule-bs16": (
        lambda: keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(**SCHEDULE)),
        16,
        dict(lr_at=lambda raw: 0.02 * 0.5 ** (raw / 5)),
    ),
    # A large epsilon makes Keras's placement (outside the bias correction) visible in update_rms;
    # a short beta2 makes v fall below its running maximum, so amsgrad's velocity_hat matters.
    "adam-amsgrad-eps-bs20": (
        lambda: keras.optimizers.Adam(0.01, beta_1=0.8, beta_2=0.9, epsilon=0.05, amsgrad=True),
        20,
        dict(lr_at=lambda raw: 0.01, beta1=0.8, beta2=0.9, eps=0.05, amsgrad=True),
    ),
    # From epoch 2 on, one variable gets no gradient while its moments are not zero.
    "adam-dropped-branch-bs16": (lambda: keras.optimizers.Adam(0.01), 16, dict(lr_at=lambda raw: 0.01)),
    "adamw-bs20-validation": (
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
        20,
        dict(lr_at=lambda raw: 0.01, weight_decay=0.1),
    ),
    "adamw-global-clipnorm-bs16": (
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1, global_clipnorm=0.5),
        16,
        dict(lr_at=lambda raw: 0.01, weight_decay=0.1, clip=0.5),
    ),
    "adam-accumulate2-bs20": (
        lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
        20,
        dict(lr_at=lambda raw: 0.01, accumulate=2),
    ),
    # A loss scale that overflows float32 (with targets scaled so that the loss is about 100): the
    # first steps are skipped (the count does not move) while the scale halves.
    "adam-lossscale-skips-bs16": (
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01), initial_scale=2.0**127),
        16,
        dict(lr_at=lambda raw: 0.01),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adam_series_match_float64_reference(K, sqlite_collector, logged, case):
    make_opt, bs, opts = CASES[case]
    cb, rec, x, y = _fit(
        K,
        sqlite_collector,
        make_opt(),
        bs,
        validation="validation" in case,
        y_scale=10.0 if "lossscale" in case else 1.0,
        drop_gate_from=2 if "dropped-branch" in case else None,
    )
    detail = sqlite_collector.api(f"/runs/{cb.run.id}")
    assert (detail["project"], detail["name"], detail["status"]) == ("keras-it", "fit", "finished")
    assert cb.run.counters["dropped"] == 0 and cb.run.counters["bad_values"] == 0

    ref, batches = _reference(rec, x, y, bs, **opts)
    names = ADAM_SERIES - ({"grad_norm"} if opts.get("clip") else set())
    _check(_series(sqlite_collector, cb.run.id), ref, GENERIC_SERIES | names)

    # The setup really exercises what the case names.
    n_batches = EPOCHS * math.ceil(N_ROWS / bs)
    assert len(batches) == n_batches
    steps = sorted(s for s, e in ref.items() if "lr" in e)
    if "bs20" in case:
        assert any(b["n"] < bs for b in batches)  # a smaller last batch
    if "accumulate" in case:
        assert steps == list(range(n_batches // 2))
    elif "lossscale" in case:
        assert 1 <= n_batches - len(steps) <= n_batches - 10  # some steps skipped, most not
        assert steps == list(range(len(steps)))
    else:
        assert steps == list(range(n_batches))
    # Statistics were sent once per optimizer step: never for a step the loss scale skipped (whose
    # record a later step at the same index would otherwise hide), nor for a micro-batch.
    stat_calls = [step for step, names in logged if "param_norm" in names]
    assert stat_calls == steps
    if opts.get("clip"):
        assert any(ref[s]["grad_norm_clipped"] < 0.99 * ref[s]["_pre_clip"] for s in steps)  # it clipped
    if opts.get("amsgrad"):
        assert any(not torch.equal(vh, v) for b in batches for vh, v in zip(b["after"]["vh"], b["after"]["v"]))
    if "dropped-branch" in case:
        assert any(b["grads"][-1] is None and float(b["before"]["m"][-1].abs().max()) > 0 for b in batches)
    # Reporting Keras's running mean (logs["loss"]) instead would fail: it differs from the batch loss.
    if "accumulate" not in case and "lossscale" not in case:
        per_epoch = n_batches // EPOCHS
        running = []
        for e in range(EPOCHS):
            chunk = batches[e * per_epoch : (e + 1) * per_epoch]
            for k in range(len(chunk)):
                running.append(sum(c["loss"] * c["n"] for c in chunk[: k + 1]) / sum(c["n"] for c in chunk[: k + 1]))
        assert max(abs(r - b["loss"]) / b["loss"] for r, b in zip(running, batches)) > 1e-2


def test_other_optimizer_gets_generic_series_on_sampled_steps(K, sqlite_collector):
    run = optiscope.init(project="keras-it", name="sgd", url=sqlite_collector.url)
    cb, rec, x, y = _fit(K, sqlite_collector, keras.optimizers.SGD(0.05, momentum=0.9), 20, every=3, run=run)
    assert cb.run is run
    with pytest.raises(TypeError):
        K.OptiscopeCallback(run=run, project="ambiguous")
    # A run that was handed in is the caller's to finish (registered by the exporter thread, soon).
    detail = wait_until(lambda: _get_run(sqlite_collector, run.id), what="the run registered")
    assert detail["status"] == "running"
    assert run.finish(timeout=30)
    assert sqlite_collector.api(f"/runs/{run.id}")["status"] == "finished"
    ref, _ = _reference(rec, x, y, 20, lr_at=lambda raw: 0.05, adam=False)
    assert len(ref) == EPOCHS * 4
    _check(_series(sqlite_collector, run.id), ref, GENERIC_SERIES, every=3)


class _NoLossTracker(keras.Sequential if keras else object):
    """A custom train_step that steps the optimizer but never feeds Keras's loss tracker."""

    def train_step(self, data):
        x, y = data[:2]
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = (y_pred - y).pow(2).mean()
        loss.backward()
        weights = self.trainable_weights[:]
        with torch.no_grad():
            self.optimizer.apply([w.value.grad for w in weights], weights)
        return {}


def test_custom_train_step_without_loss_tracker(K, sqlite_collector, caplog):
    """No batch loss can be captured: no loss series (warned once), and the validation loss, which
    does reach the tracker after the epoch's last batch, is not taken for that batch's loss."""
    caplog.set_level(logging.WARNING, logger="optiscope")
    cb, rec, x, y = _fit(K, sqlite_collector, keras.optimizers.Adam(0.01), 16, validation=True, cls=_NoLossTracker)
    got = _series(sqlite_collector, cb.run.id)
    assert set(got) == {"lr"} | GENERIC_SERIES | ADAM_SERIES
    ref, _ = _reference(rec, x, y, 16, lr_at=lambda raw: 0.01)
    for name, points in got.items():
        assert sorted(points) == list(range(EPOCHS * 4)), name
        for step, value in points.items():
            assert value == pytest.approx(ref[step][name], rel=1e-4), (name, step)
    assert sum("no loss reached the loss tracker" in r.getMessage() for r in caplog.records) == 1


def test_adam_state_found_by_name_when_the_lists_are_absent(K, sqlite_collector, monkeypatch):
    """Another Keras version without ``_momentums``/``_velocities``: the state is found by name."""
    calls = []

    def no_lists(opt, variables):
        calls.append(1)
        return None

    from optiscope.integrations import _keras_stats

    monkeypatch.setattr(_keras_stats, "_slots_from_lists", no_lists)
    opts = dict(lr_at=lambda raw: 0.01, beta2=0.9, amsgrad=True)
    cb, rec, x, y = _fit(K, sqlite_collector, keras.optimizers.Adam(0.01, beta_2=0.9, amsgrad=True), 16)
    assert calls
    ref, _ = _reference(rec, x, y, 16, **opts)
    _check(_series(sqlite_collector, cb.run.id), ref, GENERIC_SERIES | ADAM_SERIES)


@pytest.mark.parametrize("broken", ["_adam_slots", "_statistics", "_lr"])
def test_unknown_state_never_stops_training(K, sqlite_collector, monkeypatch, caplog, broken):
    """Whatever part fails, fit() completes, the failure is logged once, and the rest is recorded."""

    def boom(*args, **kwargs):
        raise KeyError("state this integration does not know")

    monkeypatch.setattr(K.OptiscopeCallback, broken, boom)
    caplog.set_level(logging.WARNING, logger="optiscope")
    cb, rec, x, y = _fit(K, sqlite_collector, keras.optimizers.Adam(0.01), 16)
    assert sqlite_collector.api(f"/runs/{cb.run.id}")["status"] == "finished"
    warnings = [
        r
        for r in caplog.records
        if r.name == "optiscope" and r.exc_info and "state this integration does not know" in str(r.exc_info[1])
    ]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    ref, _ = _reference(rec, x, y, 16, lr_at=lambda raw: 0.01)
    got = _series(sqlite_collector, cb.run.id)
    expected = {
        "_adam_slots": {"loss", "lr"} | GENERIC_SERIES,
        "_statistics": {"loss", "lr"},
        "_lr": {"loss"} | GENERIC_SERIES | ADAM_SERIES,
    }[broken]
    assert set(got) == expected
    for name in expected:
        assert sorted(got[name]) == list(range(EPOCHS * 4)), name
        for step, value in got[name].items():
            assert value == pytest.approx(ref[step][name], rel=1e-4), (name, step)


def test_invalid_init_arguments_do_not_stop_training(K, caplog):
    caplog.set_level(logging.WARNING, logger="optiscope")
    x, y = _data()
    model = _model(keras.optimizers.Adam(0.01))
    cb = K.OptiscopeCallback(project="not a valid name!", url="http://127.0.0.1:9")
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2 and cb.run is None
    assert sum("optiscope.init() failed" in r.getMessage() for r in caplog.records) == 1


def test_no_host_read_on_the_training_thread_and_async_batch_end_kept(K, sqlite_collector, monkeypatch):
    """The per-step hook reads no tensor on the host, and the callback does not make Keras give up
    dispatching batch-end callbacks off the training thread (which would sync every step)."""
    probe = K.OptiscopeCallback(url=sqlite_collector.url)
    callbacks = keras.callbacks.CallbackList([probe, _Recorder()])
    if not hasattr(callbacks, "_async_train"):
        pytest.skip("this Keras version has no asynchronous batch-end dispatch")
    assert callbacks._async_train, "OptiscopeCallback made Keras dispatch batch ends on the training thread"

    class WithBatchEnd(keras.callbacks.Callback):  # control: the check above can fail
        def on_train_batch_end(self, batch, logs=None):
            pass

    assert not keras.callbacks.CallbackList([probe, WithBatchEnd()])._async_train

    inside = threading.local()
    reads: list[str] = []
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if getattr(inside, "flag", False):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    hook = K.OptiscopeCallback.on_train_batch_begin

    def watched(self, batch, logs=None):
        inside.flag = True
        try:
            return hook(self, batch, logs)
        finally:
            inside.flag = False

    monkeypatch.setattr(K.OptiscopeCallback, "on_train_batch_begin", watched)
    cb, rec, x, y = _fit(K, sqlite_collector, keras.optimizers.AdamW(0.01), 20)
    assert reads == []
    got = _series(sqlite_collector, cb.run.id)
    assert sorted(got["grad_norm"]) == list(range(EPOCHS * 4))  # the hook did its full work meanwhile
