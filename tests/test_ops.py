"""Checks of the operations kit: docker-compose stack, Prometheus config and
alerting rules, Alertmanager config, Grafana dashboard and provisioning.

The external validators (docker-compose, promtool, amtool) are looked up on
PATH; a missing one skips its test locally and fails it in CI (CI=true).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
RULES = ROOT / "alerts" / "optiscope.rules.yml"
RULES_TEST = ROOT / "alerts" / "optiscope.rules.test.yml"
ALERTMANAGER_CONFIG = ROOT / "alerts" / "alertmanager.yml"
DASHBOARD = ROOT / "dashboards" / "optiscope.json"
PROVISIONING = ROOT / "dashboards" / "provisioning"

SERVICES = {"postgres", "collector", "prometheus", "alertmanager", "grafana"}

# Every metric the collector documents on /metrics; dashboards may use no other.
DOCUMENTED_METRICS = frozenset(
    {
        "optiscope_run_loss",
        "optiscope_run_lr",
        "optiscope_run_grad_norm",
        "optiscope_run_param_norm",
        "optiscope_run_update_norm",
        "optiscope_run_update_ratio",
        "optiscope_run_exp_avg_norm",
        "optiscope_run_exp_avg_sq_norm",
        "optiscope_run_step",
        "optiscope_run_last_ingest_timestamp_seconds",
        "optiscope_run_alerts_firing",
        "optiscope_runs_active",
        "optiscope_ingest_batches_total",
        "optiscope_ingest_points_total",
        "optiscope_ingest_rejections_total",
        "optiscope_alerts_fired_total",
        "optiscope_webhook_deliveries_total",
    }
)
METRIC_RE = re.compile(r"optiscope_[a-z_]+")


# --------------------------------------------------------------------- helpers


def need(tool: str) -> str:
    """Path of an external tool; skip without it (fail in CI)."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a command in the repository root; fail the test on a non-zero exit."""
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"{' '.join(str(a) for a in args)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def compose_mounts(service: str) -> dict[str, Path]:
    """Bind mounts of a compose service as {container path: host path}.

    Read from docker-compose.yml itself (relative host paths are resolved
    against the repository root), so no docker-compose is needed.
    """
    spec = load_yaml(COMPOSE_FILE)["services"][service]
    mounts: dict[str, Path] = {}
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source"), volume["target"]
        else:
            parts = volume.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        if source and source.startswith((".", "/")):
            mounts[str(PurePosixPath(target))] = (ROOT / source).resolve()
    return mounts


def host_path(mounts: dict[str, Path], container_path: str) -> Path | None:
    """Where a container path lies on the host, given the bind mounts."""
    path = PurePosixPath(container_path)
    # The deepest mount wins, as in the container.
    for target, source in sorted(mounts.items(), key=lambda m: len(m[0]), reverse=True):
        try:
            rest = path.relative_to(target)
        except ValueError:
            continue
        return source.joinpath(*rest.parts) if rest.parts else source
    return None


def dashboard_panels(panels: list[dict]):
    """All panels, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict):
    """(panel id, refId, expr) for every query of every panel."""
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["id"], target.get("refId"), target.get("expr", "")


# ------------------------------------------------------------- docker-compose


def test_compose_config_is_valid():
    compose = need("docker-compose")
    run(compose, "-f", COMPOSE_FILE.name, "config", "-q")
    config = yaml.safe_load(run(compose, "-f", COMPOSE_FILE.name, "config").stdout)

    assert set(config["services"]) == SERVICES
    command = config["services"]["collector"]["command"]
    if isinstance(command, str):
        command = command.split()
    assert "serve" in command


def test_collector_command_fits_image_entrypoint():
    # The compose command is appended to the image's ENTRYPOINT: with
    # ENTRYPOINT ["optiscope"] it must not start with "optiscope" again.
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    entrypoint = json.loads(match.group(1))
    command = load_yaml(COMPOSE_FILE)["services"]["collector"]["command"]
    if isinstance(command, str):
        command = command.split()
    assert entrypoint == ["optiscope"]
    assert command[0] == "serve", command


# ----------------------------------------------------------------- Prometheus


def test_alert_rules_are_valid():
    promtool = need("promtool")
    run(promtool, "check", "rules", RULES.relative_to(ROOT))


def test_alert_rules_unit_tests_pass():
    promtool = need("promtool")
    run(promtool, "test", "rules", RULES_TEST.relative_to(ROOT))


def test_prometheus_config_is_valid(tmp_path):
    promtool = need("promtool")
    config = load_yaml(PROMETHEUS_CONFIG)
    # rule_files holds a path inside the container; point a copy at the
    # repository's rules so that promtool also loads and checks them.
    assert config["rule_files"], "no rule_files"
    config["rule_files"] = [str(RULES)]
    assert config["alerting"]["alertmanagers"], "no alertmanagers"
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    out = run(promtool, "check", "config", copy)
    assert "1 rule files found" in out.stdout + out.stderr


def test_prometheus_scrapes_the_collector():
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["optiscope"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["collector:8737"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The rule OptiscopeCollectorDown selects up{job="optiscope"}.
    assert 'up{job="optiscope"}' in RULES.read_text(encoding="utf-8")


def test_rule_files_glob_matches_exactly_the_rule_files():
    # Through the compose mounts, the rule_files globs must match the rules
    # and nothing else in alerts/ (the unit tests and alertmanager.yml are not
    # rule files: Prometheus would refuse to start with them).
    mounts = compose_mounts("prometheus")
    matched: set[Path] = set()
    for pattern in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        pattern = PurePosixPath(pattern)
        directory = host_path(mounts, str(pattern.parent))
        assert directory is not None, f"{pattern.parent} is not mounted into prometheus"
        matched |= {p for p in directory.iterdir() if fnmatch.fnmatchcase(p.name, pattern.name)}
    assert matched == {RULES.resolve()}


# --------------------------------------------------------------- Alertmanager


def test_alertmanager_config_is_valid():
    amtool = need("amtool")
    run(amtool, "check-config", ALERTMANAGER_CONFIG.relative_to(ROOT))


def test_alertmanager_is_mounted_where_the_image_reads_it():
    mounts = compose_mounts("alertmanager")
    assert mounts["/etc/alertmanager/alertmanager.yml"] == ALERTMANAGER_CONFIG.resolve()


# -------------------------------------------------------------------- Grafana


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "optiscope-runs"
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"project", "run_id"} <= set(variables)

    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [p.get("id") for p in panels]
    assert None not in ids, "a panel has no id"
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"

    for panel in panels:
        assert "gridPos" in panel, f"panel {panel['id']} has no gridPos"
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['id']} ({panel.get('title')}) has no target"
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), (panel["id"], ref_ids)
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['id']} has an empty expr"


def test_dashboard_uses_only_documented_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = {m for _, _, expr in dashboard_exprs(dashboard) for m in METRIC_RE.findall(expr)}
    assert used, "no optiscope metric in the dashboard"
    assert used <= DOCUMENTED_METRICS, f"undocumented metrics: {sorted(used - DOCUMENTED_METRICS)}"


def test_dashboard_exprs_parse(tmp_path):
    promtool = need("promtool")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = []
    for panel_id, ref_id, expr in dashboard_exprs(dashboard):
        expr = expr.replace("$project", ".*").replace("$run_id", ".*")
        assert "$" not in expr, f"panel {panel_id}: unknown template variable in {expr!r}"
        rules.append({"record": f"dashboard:panel_{panel_id}_{ref_id}", "expr": expr})
    assert rules
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False),
        encoding="utf-8",
    )
    out = run(promtool, "check", "rules", path)
    assert f"{len(rules)} rules found" in out.stdout + out.stderr


def test_grafana_provisioning():
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    prometheus = next(d for d in datasources if d["type"] == "prometheus")
    assert prometheus["uid"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True

    providers = load_yaml(PROVISIONING / "dashboards" / "optiscope.yml")["providers"]
    assert len(providers) == 1
    provider = providers[0]
    assert provider["type"] == "file"

    mounts = compose_mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING.resolve()
    # The provider reads the directory that compose mounts from dashboards/.
    dashboards_dir = host_path(mounts, provider["options"]["path"])
    assert dashboards_dir is not None, "the provider path is not mounted into grafana"
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
