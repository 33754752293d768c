"""Debian's Prometheus scraping a running whepfan, configured from deploy/prometheus/.

The test derives its config from deploy/prometheus/prometheus.yml, changing only what a
test must (1 s intervals, the live server as the target, plain HTTP on loopback, the rule
and token file paths), starts /usr/bin/prometheus on a free loopback port with its own
TSDB directory, and asks its HTTP API (``/api/v1/...``) what it scraped: whepfan's series,
a viewer it carries, the alerting rules of deploy/prometheus/whepfan-alerts.yml, and
every expression of the Grafana dashboard (deploy/grafana/whepfan.json).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _peers import DecodingViewer, only_loopback_candidates
from _server import LiveServer, live_server
from _signalling import AUTH, exchange, negotiate, placeholder_publisher

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "whepfan.json"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
METRICS_TOKEN = "prometheus-scrape-token"
START_TIMEOUT = 60.0
# Scrapes are 1 s apart; on a loaded machine a few may come late.
SCRAPE_TIMEOUT = 30.0
NEEDS = "apt-get install -y prometheus (Debian's, with promtool)"
ALERT_RULES = 7  # alerting rules in whepfan-alerts.yml


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def derived_config(target: str, token_file: Path) -> str:
    """deploy/prometheus/prometheus.yml with the test's target, scheme, intervals and
    paths; every other line as operators get it."""
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8")
    for pattern, replacement in (
        (r"scrape_interval: 15s", "scrape_interval: 1s"),
        (r"evaluation_interval: 15s", "evaluation_interval: 1s"),
        (r"- /etc/prometheus/whepfan-alerts\.yml", f"- {PROMETHEUS_DIR / 'whepfan-alerts.yml'}"),
        (r"scheme: https", "scheme: http"),
        (
            r"credentials_file: /etc/prometheus/whepfan-metrics-token",
            f"credentials_file: {token_file}",
        ),
        (r'targets: \["whepfan\.example\.net:443"\]', f'targets: ["{target}"]'),
    ):
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"deploy/prometheus/prometheus.yml has no single /{pattern}/"
    return text


@dataclass
class Prometheus:
    url: str
    target: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        """A GET on the HTTP API; its ``data`` (the call must succeed, as API v1 says)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector (or a scalar as a one-element vector)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = SCRAPE_TIMEOUT) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a sample; fails the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"Prometheus never returned {expr!r}; its log:\n{log}")
            time.sleep(0.25)


@pytest.fixture(scope="module")
def whepfan() -> Iterator[LiveServer]:
    server = live_server(metrics_token=METRICS_TOKEN)
    yield server
    server.close()


@pytest.fixture(scope="module")
def prometheus(
    whepfan: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    for binary in (PROMETHEUS, PROMTOOL):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: {NEEDS}", pytrace=False)
    state = tmp_path_factory.mktemp("prometheus")
    token_file = state / "whepfan-metrics-token"
    token_file.write_text(METRICS_TOKEN, encoding="utf-8")
    target = urllib.parse.urlsplit(whepfan.url).netloc
    config = state / "prometheus.yml"
    config.write_text(derived_config(target, token_file), encoding="utf-8")
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = _free_port()
    log_path = state / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={state / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Prometheus(f"http://127.0.0.1:{port}", target, process, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(running.url):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_prometheus_scrapes_whepfan_with_the_metrics_token(prometheus: Prometheus) -> None:
    (up,) = prometheus.wait_for(f'up{{job="whepfan",instance="{prometheus.target}"}} == 1')
    assert up["value"][1] == "1"
    (target,) = prometheus.api("targets", state="active")["activeTargets"]
    assert target["health"] == "up" and target["lastError"] == "", target
    assert target["scrapeUrl"] == f"http://{prometheus.target}/metrics"
    (workers,) = prometheus.wait_for("whepfan_workers")
    assert workers["metric"] == {
        "__name__": "whepfan_workers",
        "job": "whepfan",
        "instance": prometheus.target,
    }
    assert workers["value"][1] == "1"
    # Counters arrive with their _total suffix, histograms with buckets, per worker.
    names = set(prometheus.api("label/__name__/values", **{"match[]": '{job="whepfan"}'}))
    assert {
        "whepfan_viewers",
        "whepfan_sent_packets_total",
        "whepfan_sent_bytes_total",
        "whepfan_admission_refusals_total",
        "whepfan_worker_receive_delay_seconds",
        "whepfan_session_setup_seconds_bucket",
    } <= names
    refusals = prometheus.query("whepfan_admission_refusals_total")
    assert {series["metric"]["reason"] for series in refusals} >= {"worker_budget", "draining"}


async def test_prometheus_sees_a_viewer_and_its_packets(
    prometheus: Prometheus, whepfan: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_loopback_candidates(monkeypatch)
    publisher = placeholder_publisher()
    viewer = DecodingViewer()
    async with aiohttp.ClientSession(whepfan.url) as http:
        try:
            await negotiate(http, publisher, "/whip/scraped", AUTH)
            _, answer = await exchange(http, "/whep/scraped", await viewer.offer())
            await viewer.accept(answer)
            await viewer.wait_frames(5)
            (viewers,) = prometheus.wait_for("sum(whepfan_viewers) == 1")
            assert viewers["value"][1] == "1"
            prometheus.wait_for("sum(whepfan_sent_packets_total) > 0")
            # The publisher's and the viewer's ICE + DTLS, timed by the server.
            prometheus.wait_for("sum(whepfan_session_setup_seconds_count) >= 2")
        finally:
            await viewer.close()
            await publisher.close()


def test_alerting_rules_load_and_evaluate(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while True:
        groups = prometheus.api("rules", type="alert")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        evaluated = [rule for rule in rules if rule["lastEvaluation"] > "0001-01-01T00:00:00Z"]
        if len(evaluated) == ALERT_RULES or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert [group["name"] for group in groups] == ["whepfan"]
    assert len(rules) == ALERT_RULES
    scraped = set(prometheus.api("label/__name__/values", **{"match[]": '{job="whepfan"}'}))
    for rule in rules:
        assert rule["health"] == "ok", rule
        # A misspelt metric would evaluate "ok" to nothing and never fire.
        named = set(re.findall(r"\b(?:whepfan_[a-z_]+|up)\b", rule["query"]))
        assert named and named <= scraped, (rule["name"], named - scraped)
    # An idle server pages nobody.
    assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _as_prometheus_sees_it(expr: str) -> str:
    """The expression once Grafana has put in its variables: all servers selected,
    ``$__rate_interval`` ten scrape intervals (Grafana's is at least four; more leaves
    room for scrapes a loaded machine delays)."""
    return expr.replace("$__rate_interval", "10s").replace(
        'instance=~"$instance"', 'instance=~".+"'
    )


def test_every_dashboard_expression_evaluates(prometheus: Prometheus) -> None:
    # rate() needs two samples in its window: wait for enough scrapes.
    prometheus.wait_for("count_over_time(whepfan_workers[1m]) >= 5")
    expressions = _dashboard_expressions()
    assert len(expressions) >= 20
    for expr in expressions:
        result = prometheus.query(_as_prometheus_sees_it(expr))
        filtered = re.search(r"[<>]=?\s*(\+Inf|0)\s*$", expr) is not None
        # Only a filter (drops > 0, a budget < +Inf) may leave an idle server's series out.
        assert result or filtered, f"{expr!r} returned nothing"
        for series in result:
            value = float(series["value"][1])
            assert not math.isinf(value) or "budget" in expr, (expr, series)
    # The dashboard's server selector lists this server.
    instances = prometheus.api("label/instance/values", **{"match[]": "whepfan_workers"})
    assert instances == [prometheus.target]
