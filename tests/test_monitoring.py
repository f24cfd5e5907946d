"""The monitoring profile: Grafana dashboard, Prometheus config and alert rules.

Structure is read from the files; every PromQL expression is parsed by a real PromQL parser
(promql-parser, and promtool where installed, which also runs the rules' unit tests in
docker/monitoring/alerts.test.yml); every metric and label they query is checked against
the /metrics of a real gateway and worker.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EVENT_GUARD_S, SAMPLES, wait_for

yaml = pytest.importorskip("yaml")
promql = pytest.importorskip("promql_parser")

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "docker" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "ddim-inversion.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "ddim-inversion.yml"
ALERTS = MONITORING / "alerts.yml"
PROMETHEUS = MONITORING / "prometheus.yml"

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
"""Grafana's built-in range variables, replaced by a duration before PromQL parsing."""

REQUIRED_ALERTS = {
    "NoLiveWorkerWhileJobsQueued",
    "QueueWaitP95High",
    "GatewayServerErrors",
    "JobsFailedWorkerLost",
    "JobsFailedGpuOutOfMemory",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> dict[str, str]:
    """Every target's PromQL, by panel title and refId."""
    exprs = {}
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs[f"{panel['title']}/{target['refId']}"] = expr
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def all_exprs() -> dict[str, str]:
    return {**dashboard_exprs(), **{f"alert {r['alert']}": r["expr"] for r in alert_rules()}}


# -- what an expression queries -----------------------------------------------------------


def selectors(expr: Any) -> list[Any]:
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            found.append(node)

    promql.walk(expr, visit)
    return found


def grouping_labels(expr: Any) -> list[tuple[set[str], list[Any]]]:
    """For each `by (...)` aggregation: its labels and the selectors it aggregates."""
    found: list[tuple[set[str], list[Any]]] = []

    def visit(node: Any) -> None:
        if not isinstance(node, promql.AggregateExpr) or node.modifier is None:
            return
        if node.modifier.type == promql.AggModifierType.By:
            found.append((set(node.modifier.labels), selectors(node.expr)))

    promql.walk(expr, visit)
    return found


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_structure_and_datasource() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (source,) = [d for d in provisioned if d["type"] == "prometheus"]
    panels = board["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        for datasource in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert datasource == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):  # no two panels overlap
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_what_operators_watch() -> None:
    queried = {s.name for expr in dashboard_exprs().values() for s in selectors(promql.parse(expr))}
    for metric in (
        "inversion_queue_jobs",
        "inversion_queue_estimated_wait_seconds",
        "inversion_worker_images_per_second",
        "inversion_jobs_ended_total",
        "inversion_failed_jobs",
        "inversion_model_job_queue_wait_seconds_bucket",
        "inversion_model_job_run_seconds_bucket",
        "inversion_http_requests_total",
        "inversion_live_workers",
        "inversion_model_live_workers",
    ):
        assert metric in queried, f"no panel shows {metric}"


def test_queues_waits_and_workers_are_shown_per_model() -> None:
    """Each model has its own queue and workers: a pool-wide sum would hide the model
    whose jobs wait while another's workers idle."""
    for metric in (
        "inversion_queue_jobs",
        "inversion_queue_estimated_wait_seconds",
        "inversion_model_job_queue_wait_seconds_bucket",
        "inversion_model_live_workers",
    ):
        grouped = [
            expr
            for expr in dashboard_exprs().values()
            if metric in expr and re.search(r"by \((\w+, )*model\b", expr)
        ]
        assert grouped, f"no panel shows {metric} per model"


def test_provisioning_matches_the_compose_mounts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    mounts = {
        volume.split(":")[1]: ROOT / volume.split(":")[0]
        for name in ("prometheus", "grafana")
        for volume in services[name]["volumes"]
        if volume.startswith("./")
    }
    for source in mounts.values():
        assert source.exists(), source
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert mounts[providers[0]["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES.parent.parent
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    config = yaml.safe_load(PROMETHEUS.read_text())
    config_dir = Path("/etc/prometheus/prometheus.yml").parent
    for rule_file in config["rule_files"]:
        assert mounts[str(config_dir / rule_file)] == ALERTS
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    (job,) = config["scrape_configs"]
    assert job["dns_sd_configs"][0]["names"] == ["gateway"]
    assert job["dns_sd_configs"][0]["port"] == 8000
    # /metrics answers only the metrics token: the scrape presents the compose secret.
    token = Path(job["authorization"]["credentials_file"])
    assert token.parent == Path("/run/secrets") and token.name in services["prometheus"]["secrets"]
    assert token.name in compose["secrets"]


# -- alerts -------------------------------------------------------------------------------


def test_alert_rules_structure() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
    failures = {r["alert"]: r["expr"] for r in rules if r["alert"].startswith("JobsFailed")}
    assert 'code="worker_lost"' in failures["JobsFailedWorkerLost"]
    assert 'code="gpu_out_of_memory"' in failures["JobsFailedGpuOutOfMemory"]


@pytest.mark.parametrize("name", sorted(all_exprs()))
def test_every_expression_parses(name: str) -> None:
    expr = promql.parse(all_exprs()[name])
    assert selectors(expr), f"{name} queries no metric"


def test_a_broken_expression_is_refused_by_the_parser() -> None:
    with pytest.raises(Exception, match="parenthes"):
        promql.parse("sum(rate(inversion_http_requests_total[5m])")


promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool is not installed")


@needs_promtool
def test_promtool_checks_the_config_and_the_rules() -> None:
    # --syntax-only: the scrape token's file is a compose secret, absent here (the rule
    # file the config names is checked on its own).
    config = ["check", "config", "--syntax-only", str(PROMETHEUS)]
    for args in (config, ["check", "rules", str(ALERTS)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=EVENT_GUARD_S
        )
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    done = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- against a running gateway and worker -------------------------------------------------


def scrape_families(base: str) -> dict[str, set[str]]:
    """Every sample name (and family name) of /metrics with the label names seen on it."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        names.setdefault(family.name, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_every_queried_metric_and_label_exists_in_metrics(shared_service) -> None:
    base = shared_service.url
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        response = httpx.post(
            base + "/v1/inversions",
            data={"prompt": "a cat", "num_inference_steps": "3"},
            files={"image": ("chelsea.png", handle, "image/png")},
        )
    assert response.status_code == 202, response.text
    job_url = base + response.json()["urls"]["self"]
    wait_for(lambda: httpx.get(job_url).json()["status"] == "succeeded", EVENT_GUARD_S, "the job")
    # The worker records its throughput in the batch's own transaction: a scrape now has it.
    exported = scrape_families(base)
    for name in (
        "inversion_worker_images_per_second",
        "inversion_queue_jobs",
        "inversion_jobs_ended_total",
        "inversion_job_queue_wait_seconds_bucket",
        "inversion_http_requests_total",
    ):
        assert exported.get(name), f"{name} has no sample after a job ran"

    problems = []
    for where, text in all_exprs().items():
        expr = promql.parse(text)
        for selector in selectors(expr):
            if selector.name not in exported:
                problems.append(f"{where}: {selector.name} is not in /metrics")
                continue
            labels = exported[selector.name]
            for matcher in selector.matchers.matchers:
                if labels and matcher.name not in labels:
                    problems.append(f"{where}: {selector.name} has no label {matcher.name}")
        for wanted, inner in grouping_labels(expr):
            available = set().union(*(exported.get(s.name, set()) for s in inner))
            if all(exported.get(s.name) for s in inner) and not wanted <= available:
                problems.append(f"{where}: by {sorted(wanted - available)} not on {available}")
    assert not problems, "\n".join(problems)
