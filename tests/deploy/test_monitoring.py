"""deploy/prometheus and deploy/grafana against a real Prometheus: promtool's checks and rule
tests, then a live Prometheus scraping a live `kvserve serve`, where every alert expression and
every dashboard query must evaluate, and the dashboard's must return series."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.server.launch import ROOT, free_port, launch, stop, wait_for

DEPLOY = Path(ROOT) / "deploy" / "prometheus"
DASHBOARD = Path(ROOT) / "deploy" / "grafana" / "kvserve.json"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
WHY = "needs Debian's prometheus package (promtool, prometheus); .ci/run installs it with apt-get where it can"
needs_prometheus = pytest.mark.skipif(not (PROMTOOL and PROMETHEUS), reason=WHY)
# what Grafana puts in place of the dashboard's variables: every model and server, a 5-minute rate
GRAFANA_VARIABLES = {"$model_name": ".*", "$instance": ".*", "$__rate_interval": "5m"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every query of every panel."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@needs_prometheus
@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                  ["test", "rules", "alerts_test.yml"]])
def test_promtool_accepts_the_config_and_the_rules_pass_their_tests(args):
    done = subprocess.run([PROMTOOL, *args], check=False, cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@needs_prometheus
def test_every_alert_has_a_rule_test():
    tests = (DEPLOY / "alerts_test.yml").read_text()
    for rule in alert_rules():
        assert f"alertname: {rule['alert']}" in tests, rule["alert"]


def test_the_dashboard_is_a_current_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39 and dash["uid"] == "kvserve"  # 39: Grafana 11.0
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["type"] in {"timeseries", "stat", "gauge"} and p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model_name", "instance"} <= names
    leftover = [e for _, e in dashboard_queries() if "$" in e]
    assert not leftover, f"a variable the test does not fill in: {leftover}"


@pytest.fixture(scope="module")
def live(smollm2_dir, tmp_path_factory):
    """A kvserve server with some traffic behind it, and a Prometheus scraping it every second with
    the shipped config (only the target, the intervals and the rules' path changed)."""
    server, base = launch(smollm2_dir)
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(DEPLOY / "alerts.yml")]
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": [base.removeprefix("http://")]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom_url = f"http://127.0.0.1:{free_port()}"
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp}/data",
                             f"--web.listen-address={prom_url.removeprefix('http://')}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _ready(prom_url), "Prometheus to be ready", timeout=60)
        wait_for(lambda: _samples(prom_url) >= 1, "Prometheus's first scrape", timeout=60)  # the traffic comes after
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        for i in range(3):
            client.completions.create(model="smol", prompt=f"Count to {i + 3}:", max_tokens=8)
        for _ in client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, stream=True):
            pass
        assert httpx.get(f"{base}/no/such/route").status_code == 404
        wait_for(lambda: _value(prom_url, "sum(kvserve:request_success_total)") >= 4,
                 "Prometheus to scrape the finished requests", timeout=60)
        seen = _samples(prom_url)
        wait_for(lambda: _samples(prom_url) >= seen + 2, "two more scrapes, for rates", timeout=60)
        yield prom_url
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        stop(server)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _samples(url: str) -> int:
    """How many times Prometheus has scraped the server in the last 10 minutes."""
    result = query(url, 'up{job="kvserve"}[10m]')
    return len(result[0]["values"]) if result else 0


def _value(url: str, expr: str) -> float:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else 0.0


@needs_prometheus
def test_prometheus_scrapes_the_servers_series(live):
    names = {r["metric"]["__name__"] for r in query(live, '{__name__=~"kvserve:.+"}')}
    for name in ("kvserve:num_requests_running", "kvserve:num_requests_waiting", "kvserve:kv_cache_usage_perc",
                 "kvserve:generation_tokens_total", "kvserve:time_to_first_token_seconds_bucket",
                 "kvserve:http_requests_total"):
        assert name in names, name
    assert _value(live, 'up{job="kvserve"}') == 1
    assert _value(live, 'sum(kvserve:http_requests_total{route="other", status="404"})') == 1


@needs_prometheus
def test_every_dashboard_query_returns_series_from_the_live_server(live):
    for title, expr in dashboard_queries():
        assert query(live, expr), f"panel {title!r}: no series for {expr}"


@needs_prometheus
def test_the_autoscalers_adapter_rule_evaluates_against_the_live_series(live):
    """prometheus-adapter fills in its template per HPA query; here as it would for the pods of one
    job (the live series have no Kubernetes labels, so the series query must parse but finds none)."""
    adapter = yaml.safe_load((Path(ROOT) / "deploy" / "kubernetes" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    query(live, rule["seriesQuery"])
    expr = (rule["metricsQuery"].replace("<<.Series>>", "kvserve:num_requests_waiting")
            .replace("<<.LabelMatchers>>", 'job="kvserve"').replace("<<.GroupBy>>", "instance"))
    assert query(live, expr), expr


@needs_prometheus
def test_every_alert_expression_evaluates_against_the_live_series(live):
    for rule in alert_rules():
        query(live, rule["expr"])  # a parse or evaluation error fails here, naming the expression

    def evaluated():
        groups = httpx.get(f"{live}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        # a rule not yet evaluated reports the zero time, 0001-01-01T00:00:00Z
        return rules if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules) else None

    rules = wait_for(evaluated, "every rule to be evaluated once", timeout=60)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert all(r["state"] == "inactive" for r in rules)  # a healthy, idle server raises no alert
