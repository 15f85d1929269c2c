"""Monitoring: compose's monitoring profile, the Kubernetes monitoring component, the scrape configs
and the Grafana dashboard, checked with the real compose binary and kubectl (tests/test_deploy.py's
helpers), and the dashboard's queries against real scrapes of every service's metrics.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis_sink import RedisSink
from test_deploy import ROOT, _compose_binary, _compose_config, _k8s_docs, _run, _workloads

from hivetrain.bootstrap.app import create_app as bootstrap_app
from hivetrain.identity import Domain
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.miner.reporting import TelemetryWriter
from hivetrain.protocol.records import Keys
from hivetrain.settings import BootstrapSettings, ValidatorSettings
from hivetrain.store import connect_redis
from hivetrain.validator.app import create_app as validator_app

pytestmark = pytest.mark.deploy

DEPLOY = ROOT / "deploy"
COMPONENT = ROOT / "k8s" / "components" / "monitoring"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hiveminer.json"
MONITORING = ("prometheus", "grafana")
#: deploy/grafana files and their copies in the k8s component (kustomize loads no file outside it)
GRAFANA_COPIES = {
    "provisioning/datasources/prometheus.yml": "datasource.yml",
    "provisioning/dashboards/hiveminer.yml": "dashboards.yml",
    "dashboards/hiveminer.json": "hiveminer.json",
}
#: The port each service serves /metrics on, by the name its pod gives the port.
METRICS_PORTS = {"bootstrap": "http", "validator": "api", "miner": "challenge"}


@lru_cache(maxsize=None)
def _compose_monitoring() -> dict:
    result = _run(
        [_compose_binary(), "-f", "docker-compose.yml", "--profile", "monitoring", "config", "--format", "json"]
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _scrape_config(path: Path) -> dict[str, dict]:
    return {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}


# --- compose -----------------------------------------------------------------------------------
def test_the_monitoring_profile_adds_prometheus_and_grafana():
    config = _compose_monitoring()
    for name in MONITORING:
        service = config["services"][name]
        assert service["profiles"] == ["monitoring"]
        assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image by tag"
        assert [port["host_ip"] for port in service["ports"]] == ["127.0.0.1"], f"{name}: publish on loopback only"
        binds = [mount for mount in service["volumes"] if mount["type"] == "bind"]
        assert binds and all(Path(m["source"]).exists() and m["read_only"] for m in binds), (
            f"{name}: read-only deploy/ files"
        )
        assert service["healthcheck"]["test"][0] == "CMD"
    assert config["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_without_the_profile_compose_is_unchanged():
    default, monitored = _compose_config("default"), _compose_monitoring()
    assert not set(MONITORING) & set(default["services"])
    assert {name: monitored["services"][name] for name in default["services"]} == default["services"]
    assert set(monitored["volumes"]) - set(default["volumes"]) == {"prometheus-data", "grafana-data"}


def test_compose_scrape_config_reaches_every_service():
    services = _compose_monitoring()["services"]
    jobs = _scrape_config(DEPLOY / "prometheus" / "prometheus.yml")
    for name, port in (("bootstrap", "HIVE_HTTP_PORT"), ("validator", "HIVE_API_PORT")):
        assert jobs[name]["static_configs"] == [{"targets": [f"{name}:{services[name]['environment'][port]}"]}]
    # scaled miners: one A record per replica under the service name, at the spot-check port they expose
    (miners,) = jobs["miner"]["dns_sd_configs"]
    port = services["miner"]["environment"]["HIVE_CHALLENGE_PORT"]
    assert (miners["names"], miners["type"], str(miners["port"])) == (["miner"], "A", port)
    assert port in services["miner"]["expose"]
    mounts = {m["target"]: m["source"] for m in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus" / "prometheus.yml")


def test_grafana_provisioning_matches_the_mounts():
    grafana = _compose_monitoring()["services"]["grafana"]
    mounts = {m["target"]: m["source"] for m in grafana["volumes"] if m["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/hiveminer.yml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == str(DASHBOARD.parent)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert DASHBOARD.parent / Path(home).relative_to(provider["options"]["path"]) == DASHBOARD
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in _compose_monitoring()["services"]


# --- kubernetes --------------------------------------------------------------------------------
@pytest.mark.parametrize("source, copy", GRAFANA_COPIES.items())
def test_the_k8s_grafana_files_are_copies_of_deploy(source, copy):
    assert (COMPONENT / "grafana" / copy).read_bytes() == (DEPLOY / "grafana" / source).read_bytes(), (
        f"out of date: cp deploy/grafana/{source} k8s/components/monitoring/grafana/{copy}"
    )


def test_k8s_pods_ask_to_be_scraped_on_their_metrics_port():
    workloads = _workloads(_k8s_docs("k8s/overlays/monitoring"))
    for name, port_name in METRICS_PORTS.items():
        template = workloads[name]["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        ports = {port["name"]: port["containerPort"] for port in template["spec"]["containers"][0]["ports"]}
        assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/path"]) == ("true", "/metrics")
        assert int(annotations["prometheus.io/port"]) == ports[port_name], (
            f"{name} serves /metrics on its {port_name} port"
        )
    base = _workloads(_k8s_docs("k8s"))
    assert not any("annotations" in w["spec"]["template"]["metadata"] for w in base.values()), "the base is unchanged"


def test_k8s_prometheus_finds_pods_of_its_namespace_by_annotation():
    docs = _k8s_docs("k8s/overlays/monitoring")
    jobs = _scrape_config(COMPONENT / "prometheus.yml")
    (discovery,) = jobs["hivetrain"]["kubernetes_sd_configs"]
    assert discovery == {"role": "pod", "namespaces": {"own_namespace": True}}
    relabel = {rule.get("target_label"): rule for rule in jobs["hivetrain"]["relabel_configs"]}
    assert relabel["job"]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], (
        "job as in compose"
    )
    prometheus = _workloads(docs)["prometheus"]["spec"]["template"]["spec"]
    (role,) = [
        doc for doc in docs if doc["kind"] == "Role" and doc["metadata"]["name"] == prometheus["serviceAccountName"]
    ]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    (binding,) = [doc for doc in docs if doc["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "hivetrain"}]
    assert not [doc for doc in docs if doc["kind"].startswith("Cluster")], "no cluster-wide rights"


def test_k8s_grafana_mounts_what_its_provisioning_names():
    docs = _k8s_docs("k8s/overlays/monitoring")
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    pod = _workloads(docs)["grafana"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    mounted = {
        m["mountPath"]: config_maps[volumes[m["name"]]]
        for m in pod["containers"][0]["volumeMounts"]
        if m["name"] in volumes
    }
    provider = yaml.safe_load(mounted["/etc/grafana/provisioning/dashboards"]["hiveminer.yml"])["providers"][0]
    assert json.loads(mounted[provider["options"]["path"]]["hiveminer.json"]) == json.loads(DASHBOARD.read_text())
    assert "datasources" in yaml.safe_load(mounted["/etc/grafana/provisioning/datasources"]["prometheus.yml"])
    services = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Service"}
    assert set(MONITORING) <= services, "the datasource URL names the prometheus Service"


# --- the dashboard -----------------------------------------------------------------------------
def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_panels_are_well_formed():
    dashboard = _dashboard()
    assert dashboard["uid"] == "hiveminer"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    for expr in _queries(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr


def _served_names(redis_url: str, wallet, wallet_dir: str) -> set[str]:
    """Sample names of a real scrape of the bootstrap app, the validator app and a miner's metrics."""
    texts = []
    for app in (
        bootstrap_app(BootstrapSettings(redis_url=redis_url, run_id="mon")),
        validator_app(ValidatorSettings(redis_url=redis_url, run_id="mon", wallet_dir=wallet_dir)),
    ):
        client = app.test_client()
        client.get("/healthz")  # request counters have samples once a request was counted
        texts.append(client.get("/metrics").text)
    metrics = MinerMetrics()  # as Miner._make_reporting sets it up
    writer = TelemetryWriter(RedisSink(connect_redis(redis_url), Keys("mon")), Domain("mon"), wallet)
    try:
        metrics.describe("QmMiner", wallet.hotkey.ss58_address, "tiny", "cpu")
        metrics.watch_telemetry(writer)
        texts.append(generate_latest(metrics.registry).decode())
    finally:
        writer.close()
    return {
        sample.name for text in texts for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_every_metric_the_dashboard_queries_is_served(redis_url, wallet, tmp_path):
    served = _served_names(redis_url, wallet, str(tmp_path))
    # our metric names all start with hive_; PromQL functions, label names and values do not
    queried = {name for expr in _queries(_dashboard()) for name in re.findall(r"\bhive_[a-z0-9_]+", expr)}
    assert {
        "hive_miner_tokens_total",
        "hive_validator_latest_eval_loss",
        "hive_bootstrap_http_requests_total",
    } <= queried
    assert not sorted(queried - served), f"the dashboard queries metrics no service serves: {sorted(queried - served)}"
    # and every miner metric has a panel (samples: the tokens counter shows the same work)
    families = {
        re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in served if name.startswith("hive_miner_")
    }
    unshown = sorted(f for f in families - {"hive_miner_samples"} if not any(name.startswith(f) for name in queried))
    assert not unshown, f"miner metrics no panel shows: {unshown}"
