"""deploy/k8s/tokenwire.yaml agrees with the app: its flags parse, its ports and probes point at what the server
serves, the grace period covers the drain, the journal URL names the Redis Service, and the autoscaler and an
inference gateway read metrics the server exposes."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from tokenwire.cli import settings_from_args
from tokenwire.engine.interface import EngineStats
from tokenwire.metrics import Metrics
from tokenwire.server.running.serve import server_settings

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "tokenwire.yaml"


def docs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_the_server_flags_parse_and_ports_and_probes_agree() -> None:
    d = docs()
    deployment = d[("Deployment", "tokenwire")]
    c = container(deployment)
    assert c["args"][0] == "serve"
    settings = settings_from_args(c["args"])  # every flag exists and has a valid value
    server_settings(settings)  # and the combination is accepted (a shared journal needs a resume window)
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.port and annotations["prometheus.io/path"] == "/metrics"
    service = d[("Service", "tokenwire")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_grace_period_covers_the_pre_stop_pause_and_the_drain() -> None:
    deployment = docs()[("Deployment", "tokenwire")]
    c = container(deployment)
    settings = settings_from_args(c["args"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause + settings.drain_timeout + 5 <= grace  # and 5 s to close sockets and hand streams over


def test_the_journal_is_the_redis_service() -> None:
    d = docs()
    settings = settings_from_args(container(d[("Deployment", "tokenwire")])["args"])
    url = urlparse(settings.journal)
    assert url.scheme == "redis"
    redis_service = d[("Service", url.hostname or "")]
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [url.port]
    redis = d[("Deployment", url.hostname or "")]
    assert redis_service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert container(redis)["ports"][0]["containerPort"] == url.port


def test_the_autoscaler_and_a_gateway_read_metrics_the_server_exposes() -> None:
    d = docs()
    hpa = d[("HorizontalPodAutoscaler", "tokenwire")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tokenwire"}
    stats = EngineStats(running=2, waiting=3, max_batch_size=8, kv_cache_tokens_used=512, kv_cache_tokens_budget=2048)
    text = Metrics(lambda: stats, lambda: 0).exposition().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    for metric in hpa["spec"]["metrics"]:
        assert float(samples[metric["pods"]["metric"]["name"]]) == 3
    # the Gateway API Inference Extension's default names for a model server's queue, batch and KV use
    assert float(samples["vllm:num_requests_waiting"]) == 3 and float(samples["vllm:num_requests_running"]) == 2
    assert float(samples["vllm:kv_cache_usage_perc"]) == 0.25
