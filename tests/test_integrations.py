"""The Lightning and transformers callbacks, end to end: a tiny model trained for real by the
framework on CPU, the callback streaming to the real collector, and the REST API checked against
what the framework itself computed (its losses, learning rates, gradients and final weights).
"""

from __future__ import annotations

import math
import subprocess
import sys
import urllib.error

import pytest
import torch

import optiscope

from conftest import missing

CANONICAL = ("lr", "grad_norm", "param_norm", "update_norm", "update_ratio", "exp_avg_norm", "exp_avg_sq_norm")
CLIP = 0.05  # small enough that every step clips, so "grad_norm is pre-clip" is a real check


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        missing(f"{module} is not importable: {e}")


def _norm64(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def _series(collector, run_id: str, name: str) -> tuple[list, list]:
    try:
        data = collector.api(f"/runs/{run_id}/series/{name}")
    except urllib.error.HTTPError as e:
        pytest.fail(
            f"GET series {name!r} of run {run_id}: {e}; the collector has: {_top_level_names(collector, run_id)}"
        )
    assert not data["truncated"]
    return data["steps"], data["values"]


def _run(collector, run_id: str) -> dict:
    try:
        return collector.api(f"/runs/{run_id}")
    except urllib.error.HTTPError as e:
        pytest.fail(f"run {run_id} is not in the collector ({e}): see the optiscope warnings in the captured log")


def _top_level_names(collector, run_id: str) -> str:
    try:
        return ", ".join(sorted(n for n in _names(collector, run_id) if "/" not in n))
    except urllib.error.HTTPError as e:
        return f"no such run ({e})"


def _names(collector, run_id: str) -> set[str]:
    return {s["name"] for s in collector.api(f"/runs/{run_id}/series")["series"]}


def test_the_core_imports_no_framework():
    code = (
        "import sys, optiscope, optiscope.integrations; "
        "print(sorted({'lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'keras'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- Lightning ---------------------------------------------------------------------------------
def _tiny_lightning(L, crash_at: int | None = None):
    """A LightningModule that is also a plain nn.Module, so the same model and optimizer can be
    trained by Lightning or by a hand-written loop."""

    class TinyMLP(L.LightningModule):
        def __init__(self, lr: float = 3e-2, hidden: int = 16):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
            self.losses: list[float] = []  # every micro-batch loss, as the framework computed it

        def training_step(self, batch, batch_idx):
            if crash_at is not None and batch_idx == crash_at:
                raise RuntimeError("boom")
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7 ** (s // 4))  # changes every 4 steps
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    return TinyMLP()


def _loader(n: int = 96, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    ds = torch.utils.data.TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def _trainer(L, tmp_path, callbacks, **kw):
    return L.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=CLIP,
        **kw,
    )


def _recorder(L):
    class Recorder(L.Callback):
        """What the optimizer is about to step with: lr and the gradient norm before Lightning clips."""

        def __init__(self):
            self.lrs, self.grad_norms = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            self.grad_norms.append(_norm64(p.grad for p in pl_module.parameters()))

    return Recorder()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_callback_end_to_end(sqlite_collector, tmp_path, accumulate):
    L = _need("lightning")
    from optiscope.integrations.lightning import OptiscopeCallback

    module, rec = _tiny_lightning(L), _recorder(L)
    cb = OptiscopeCallback(project="lightning", name=f"mlp-acc{accumulate}", url=sqlite_collector.url, every=1)
    trainer = _trainer(L, tmp_path, [cb, rec], max_epochs=2, accumulate_grad_batches=accumulate)
    trainer.fit(module, _loader())
    steps = trainer.global_step
    assert steps == 24 // accumulate and len(rec.lrs) == steps

    detail = _run(sqlite_collector, cb.run.id)
    assert detail["status"] == "finished" and detail["project"] == "lightning"
    assert detail["config"] == {"lr": 3e-2, "hidden": 16}  # the module's hparams

    # One loss point per optimizer step: the mean of its micro-batch losses.
    expected = [sum(module.losses[i * accumulate : (i + 1) * accumulate]) / accumulate for i in range(steps)]
    got_steps, got = _series(sqlite_collector, cb.run.id, "loss")
    assert got_steps == list(range(steps))
    assert got == pytest.approx(expected, rel=1e-6)

    for name in CANONICAL:
        assert _series(sqlite_collector, cb.run.id, name)[0] == list(range(steps)), name
    # The schedule really moved, and the probe saw the lr each step ran with.
    assert len(set(rec.lrs)) > 2
    assert _series(sqlite_collector, cb.run.id, "lr")[1] == pytest.approx(rec.lrs, rel=1e-12)
    # Lightning runs backward inside optimizer.step(closure): the probe must still see this step's
    # gradients, before Lightning clips them (not the previous step's, not the clipped ones).
    assert min(rec.grad_norms) > 2 * CLIP
    assert _series(sqlite_collector, cb.run.id, "grad_norm")[1] == pytest.approx(rec.grad_norms, rel=1e-5)
    assert _series(sqlite_collector, cb.run.id, "grad_norm_clipped")[1] == pytest.approx([CLIP] * steps, rel=1e-4)
    assert _series(sqlite_collector, cb.run.id, "param_norm")[1][-1] == pytest.approx(
        _norm64(module.parameters()), rel=1e-5
    )


def test_lightning_and_plain_pytorch_report_the_same_series(sqlite_collector, tmp_path):
    L = _need("lightning")
    from optiscope.integrations.lightning import OptiscopeCallback

    # Plain PyTorch: the same module, optimizer, schedule and clipping, in a hand-written loop.
    module = _tiny_lightning(L)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    plain = optiscope.init(project="lightning", name="plain", url=sqlite_collector.url)
    plain.watch(opt, module, every=1)
    for i, batch in enumerate(_loader()):
        loss = module.training_step(batch, i)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        opt.step()
        sched.step()
        plain.log({"loss": loss})
    assert plain.finish(timeout=30)

    cb = OptiscopeCallback(project="lightning", name="callback", url=sqlite_collector.url, every=1)
    _trainer(L, tmp_path, [cb], max_epochs=1).fit(_tiny_lightning(L), _loader())

    names = _names(sqlite_collector, plain.id)
    assert set(CANONICAL) | {"loss", "grad_norm/param/net.0.weight"} <= names
    assert _names(sqlite_collector, cb.run.id) == names


def test_lightning_exception_marks_the_run_crashed(sqlite_collector, tmp_path):
    L = _need("lightning")
    from optiscope.integrations.lightning import OptiscopeCallback

    cb = OptiscopeCallback(project="lightning", name="crash", url=sqlite_collector.url, every=1)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(L, tmp_path, [cb], max_epochs=1).fit(_tiny_lightning(L, crash_at=5), _loader())
    assert _run(sqlite_collector, cb.run.id)["status"] == "crashed"
    assert _series(sqlite_collector, cb.run.id, "loss")[0] == list(range(5))


# -- transformers ------------------------------------------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(2))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_transformers_callback_end_to_end(sqlite_collector, tmp_path):
    transformers = _need("transformers")
    _need("accelerate")
    from optiscope.integrations.transformers import OptiscopeCallback

    steps = 30
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=5,
        max_grad_norm=0.5,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    cb = OptiscopeCallback(project="hf", name="gpt2-tiny", url=sqlite_collector.url, every=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(64, 16, 64), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == steps

    detail = _run(sqlite_collector, cb.run.id)
    assert detail["status"] == "finished" and detail["project"] == "hf"
    assert detail["config"]["learning_rate"] == 1e-2 and detail["config"]["max_steps"] == steps

    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] - 1 for h in history] == list(range(steps))
    got_steps, got = _series(sqlite_collector, cb.run.id, "loss")
    assert got_steps == list(range(steps))
    assert got == pytest.approx([h["loss"] for h in history], rel=1e-9)
    for name in CANONICAL:
        assert _series(sqlite_collector, cb.run.id, name)[0] == list(range(steps)), name

    # The lr the Trainer reports for each step (warmup, then linear decay) is the probe's lr.
    assert len({h["learning_rate"] for h in history}) > 2
    assert _series(sqlite_collector, cb.run.id, "lr")[1] == pytest.approx(
        [h["learning_rate"] for h in history], rel=1e-9
    )
    # The Trainer's grad_norm is logged under its own name, and agrees with the probe's (pre-clip).
    hf_norms = [h["grad_norm"] for h in history]
    assert _series(sqlite_collector, cb.run.id, "hf_grad_norm")[1] == pytest.approx(hf_norms, rel=1e-9)
    assert _series(sqlite_collector, cb.run.id, "grad_norm")[1] == pytest.approx(hf_norms, rel=1e-5)
    assert _series(sqlite_collector, cb.run.id, "param_norm")[1][-1] == pytest.approx(
        _norm64(model.parameters()), rel=1e-5
    )
