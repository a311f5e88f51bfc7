"""deploy/compose.yaml (and its GPU override) against the Compose specification's JSON schema,
and the wiring between its services, the server's CLI and the monitoring files."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.guard import ServerOptions
from tests.server.launch import ROOT

DEPLOY = Path(ROOT) / "deploy"
# schema/compose-spec.json of github.com/compose-spec/compose-spec (Apache-2.0) at 170098b, 2026-06-23
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_follow_the_compose_specification(name):
    jsonschema.Draft7Validator(SCHEMA).validate(load(name))


def test_the_schema_catches_what_it_should():
    broken = load("compose.yaml")
    broken["services"]["kvserve"]["healthcheck"]["interval"] = ["15s"]  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMA).validate(broken)


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, duration
    return float(m.group(1))


def test_services_are_wired_together():
    compose = load("compose.yaml")
    services = compose["services"]
    assert set(services) == {"kvserve", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["restart"] == "unless-stopped", name
    kv = services["kvserve"]
    assert (DEPLOY / kv["build"]["context"] / kv["build"]["dockerfile"]).is_file()
    command = kv["command"]
    assert command[:2] == ["/app/.venv/bin/kvserve", "serve"] and _option(command, "--port") == "8000"
    assert "/health" in " ".join(kv["healthcheck"]["test"]) and "8000" in " ".join(kv["healthcheck"]["test"])
    # the container gets its SIGKILL only after the server's own drain has ended
    assert _seconds(kv["stop_grace_period"]) > float(_option(command, "--shutdown-timeout"))
    assert float(_option(command, "--shutdown-timeout")) >= ServerOptions.shutdown_timeout
    assert any(v.startswith("model-cache:") for v in kv["volumes"]) and "model-cache" in compose["volumes"]
    assert "KVSERVE_API_KEY" in kv["environment"] and "${KVSERVE_API_KEY?" in kv["environment"]["KVSERVE_API_KEY"]
    assert services["prometheus"]["depends_on"] == {"kvserve": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in compose["volumes"], source


def test_monitoring_points_at_the_compose_services():
    prometheus = load("prometheus/prometheus.yml")
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["kvserve:8000"]
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"
    datasource = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["isDefault"]
    provider = load("grafana/provisioning/dashboards/kvserve.yml")["providers"][0]
    grafana = load("compose.yaml")["services"]["grafana"]
    assert any(v.endswith(f":{provider['options']['path']}/kvserve.json:ro") for v in grafana["volumes"])


def test_the_api_key_comes_from_an_uncommitted_env_file():
    example = (DEPLOY / ".env.example").read_text()
    assert re.search(r"^KVSERVE_API_KEY=", example, re.M) and re.search(r"^GRAFANA_ADMIN_PASSWORD=", example, re.M)
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "deploy/.env must be ignored by git"


def test_the_gpu_override_reserves_nvidia_devices():
    kv = load("compose.gpu.yaml")["services"]["kvserve"]
    (device,) = kv["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "cu" in kv["build"]["args"]["TORCH_INDEX"] and kv["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda")
