"""What a run registers: tags and each rank's environment, within the collector's bounds; a new
registration when watch() finds CUDA up; an older collector that refuses the new fields; and the
same through the spool's replay and the framework callbacks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import optiscope
from optiscope import wire
from optiscope.probe import environment
from optiscope.transport import rundoc
from optiscope.transport.http import HttpClient
from optiscope.transport.spool import pending_spools, replay

from conftest import free_port, wait_until
from fake_collector import FakeCollector

#: The fields the collector's registration model allows (it forbids any other).
ALLOWED = {"project", "name", "config", "rank", "host", "pid", "tags", "environment"}


@pytest.fixture
def fake():
    f = FakeCollector()
    yield f
    f.close()


def registered(fake, run, n=1):
    wait_until(lambda: len(fake.puts()) >= n, 10, what=f"{n} registrations")
    return fake.puts()[n - 1].body


def test_tags_and_environment_are_registered(fake):
    run = optiscope.init(
        project="reg", url=fake.url, tags=["baseline", "lr=3e-4", "team/vision"], environment={"cluster": "a100-pool"}
    )
    doc = registered(fake, run)
    assert set(doc) <= ALLOWED
    assert doc["tags"] == ["baseline", "lr=3e-4", "team/vision"]
    env = doc["environment"]
    assert env["cluster"] == "a100-pool"  # the user's entry, on top of the fingerprint
    assert env["python"] and env["torch"] == torch.__version__ and "git" in env
    assert len(json.dumps(env)) <= wire.MAX_ENVIRONMENT_BYTES
    assert run.finish(timeout=10)


def test_environment_false_and_no_tags_send_neither(fake):
    run = optiscope.init(project="reg", url=fake.url, environment=False)
    doc = registered(fake, run)
    assert "environment" not in doc and "tags" not in doc
    assert set(doc) == {"project", "name", "config", "rank", "host", "pid"}
    run.finish(timeout=10)


def test_user_entries_override_the_fingerprint(fake):
    run = optiscope.init(project="reg", url=fake.url, environment={"python": "pinned", "slurm_job": 42})
    env = registered(fake, run)["environment"]
    assert env["python"] == "pinned" and env["slurm_job"] == 42 and env["platform"]
    run.finish(timeout=10)


def test_invalid_tags_are_dropped_with_one_warning(fake, caplog):
    with caplog.at_level(logging.WARNING, logger="optiscope"):
        run = optiscope.init(project="reg", url=fake.url, tags=["ok", "has space", "-lead", "ok", 5, "x" * 101])
    assert registered(fake, run)["tags"] == ["ok"]
    assert sum("tags dropped" in r.message for r in caplog.records) == 1
    run.finish(timeout=10)


def test_tag_bounds_and_a_single_string(fake):
    run = optiscope.init(project="reg", url=fake.url, tags=[f"t{i}" for i in range(wire.MAX_TAGS + 5)])
    assert registered(fake, run)["tags"] == [f"t{i}" for i in range(wire.MAX_TAGS)]
    run.finish(timeout=10)
    assert rundoc.clean_tags("single") == (["single"], [])
    assert rundoc.clean_tags(["a\n"]) == ([], ["a\n"])  # a whole-string match: no trailing newline


def test_argument_checks_raise_in_init():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError):
        optiscope.init(url=url, environment="yes")
    with pytest.raises(ValueError):
        optiscope.init(url=url, tags=5)
    with pytest.raises(ValueError):
        optiscope.init(url=url, heartbeat_interval=0)
    with pytest.raises(ValueError):
        optiscope.init(url=url, rank=wire.MAX_RANK + 1)


def test_an_oversized_environment_is_cut_to_the_bound(fake, caplog):
    with caplog.at_level(logging.WARNING, logger="optiscope"):
        run = optiscope.init(project="reg", url=fake.url, environment={"blob": "x" * 20_000, "small": 1})
    env = registered(fake, run)["environment"]
    assert "blob" not in env and env["truncated"] == ["blob"] and env["small"] == 1 and env["python"]
    assert len(json.dumps(env)) <= wire.MAX_ENVIRONMENT_BYTES
    assert "over 16384 bytes" in caplog.text
    run.finish(timeout=10)
    # Many large entries: the list of what left is itself bounded.
    env, cut = rundoc.bound_environment({f"k{i}" * 300: "v" * 100 for i in range(200)}, limit=2048)
    assert len(json.dumps(env)) <= 2048 and len(cut) > 0


def test_unjsonable_entries_become_strings(fake):
    run = optiscope.init(project="reg", url=fake.url, environment={"path": __import__("pathlib").Path("/data")})
    assert registered(fake, run)["environment"]["path"] == "/data"
    run.finish(timeout=10)


def test_an_older_collector_gets_the_core_document(caplog):
    old = FakeCollector(refuse_optional=True)
    try:
        with caplog.at_level(logging.WARNING, logger="optiscope"):
            run = optiscope.init(project="reg", url=old.url, tags=["a"], flush_interval=0.05)
            run.log({"loss": 1.0}, step=0)
            assert run.finish(timeout=10)  # the data is delivered all the same
        first, second = old.puts()[:2]
        assert "environment" in first.body and "tags" in first.body
        assert set(second.body) == {"project", "name", "config", "rank", "host", "pid"}
        assert len(old.batches()) == 1
        assert "registered without them" in caplog.text and "rejected with 422" not in caplog.text
    finally:
        old.close()


def test_watch_registers_again_once_cuda_is_up(fake, spool_dir, monkeypatch):
    """CUDA cannot come up on this machine, so its coming up is faked: the fingerprint at init()
    sees a CUDA build with CUDA not yet initialized, watch() sees it initialized with one device."""
    monkeypatch.setattr(environment, "_devices", lambda torch: {"device_count": None, "devices": None})
    run = optiscope.init(project="reg", url=fake.url, flush_interval=0.05)
    assert registered(fake, run)["environment"]["devices"] is None
    run.log({"loss": 1.0}, step=0)
    wait_until(lambda: fake.batches(), what="a first batch")

    monkeypatch.setattr(environment, "cuda_initialized", lambda: True)
    monkeypatch.setattr(environment, "_devices", lambda torch: {"device_count": 1, "devices": ["Fake GPU"]})
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    run.watch(opt, model, every=1)
    run.log({"loss": 2.0}, step=1)
    doc = registered(fake, run, 2)
    assert doc["environment"]["devices"] == ["Fake GPU"] and doc["environment"]["device_count"] == 1
    wait_until(lambda: len(fake.batches()) >= 2, what="a batch after the new registration")
    put2 = fake.puts()[1]
    assert put2.t <= fake.batches()[1].t  # registered again before the next batch
    spooled = json.loads((spool_dir / f"{run.id}-0" / "run.json").read_text())
    assert spooled["doc"]["environment"]["devices"] == ["Fake GPU"]  # a replay registers the new one

    run.watch(torch.optim.Adam(model.parameters()))  # devices known now: no third registration
    assert run.finish(timeout=10)
    assert len(fake.puts()) == 2


def test_watch_without_cuda_registers_once(fake):
    run = optiscope.init(project="reg", url=fake.url, flush_interval=0.05)
    model = torch.nn.Linear(2, 1)
    run.watch(torch.optim.Adam(model.parameters()), model)
    run.log({"loss": 1.0}, step=0)
    assert run.finish(timeout=10)
    assert len(fake.puts()) == 1


def left_in_spool(spool_dir):
    run = optiscope.init(
        project="reg", url=f"http://127.0.0.1:{free_port()}", tags=["replayed"], environment={"cluster": "b"}
    )
    run.log({"loss": 1.0}, step=0)
    assert run.finish(timeout=0.5) is False  # nobody listens: the batch stays in the spool
    (left,) = pending_spools(spool_dir)
    return left


@pytest.mark.parametrize("refuse", [False, True], ids=["collector", "older-collector"])
def test_a_replayed_spool_registers_tags_and_environment(spool_dir, refuse):
    left = left_in_spool(spool_dir)
    f = FakeCollector(refuse_optional=refuse)
    try:
        assert replay(left, HttpClient(f.url)) == ("done", 1)
        put = f.puts()[-1].body
        if refuse:  # registered without them, and the batch went all the same
            assert "environment" not in put and "tags" not in put and len(f.puts()) == 2
        else:
            assert put["tags"] == ["replayed"] and put["environment"]["cluster"] == "b"
        assert len(f.batches()) == 1
    finally:
        f.close()


def test_framework_callbacks_pass_tags_and_environment_through(fake):
    from optiscope.integrations._base import RunOwner

    owner = RunOwner(project="cb", url=fake.url, tags=["from-callback"], environment={"k": "v"}, heartbeat_interval=0.2)
    run = owner._start_run(lambda: {"lr": 0.1})
    doc = registered(fake, run)
    assert doc["tags"] == ["from-callback"] and doc["environment"]["k"] == "v" and doc["config"] == {"lr": 0.1}
    # the exporter option reached the run: a quiet run beats every 0.2 s (the default is 30 s)
    wait_until(lambda: len(fake.heartbeats()) >= 2, 10, what="heartbeats at the interval the callback passed")
    beats = fake.heartbeats()
    assert 0.15 <= beats[1].t - beats[0].t < 2
    owner._end_run()
