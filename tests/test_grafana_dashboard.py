"""deploy/grafana/whepfan.json: a dashboard whose every PromQL expression (panel targets,
template variable queries) names only series a running whepfan exports, read from its
``/metrics`` with prometheus_client's own parser; and the panels operators look for.

tests/test_prometheus.py evaluates the same expressions in a real Prometheus; this module
needs no Prometheus, only a live server.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _server import LiveServer, live_server
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "whepfan.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL's words that are not metric names: aggregation and set operators, modifiers,
# keywords (https://prometheus.io/docs/prometheus/latest/querying/operators/).
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACKETED = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_DURATION = re.compile(r"(?<![\w:])(?:\d+(?:ms|[smhdwy]))+(?![\w:])")  # offset 1h30m
_NUMBER = re.compile(r"(?<![\w:])[+-]?(?:\d+\.?\d*(?:e[+-]?\d+)?|0x[0-9a-f]+)(?![\w:])", re.I)
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not function
    calls, keywords, label names (inside ``{}``, ``by (...)``) or durations (``[5m]``).
    Grafana's ``$variables`` only appear inside those, or as ``label_values(m, l)``."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    text = _GROUPING.sub(" ", text)
    while _BRACKETED.search(text):
        text = _BRACKETED.sub(" ", text)
    text = _DURATION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        follows = text[match.end() :].lstrip()[:1]
        word = match.group()
        if (
            follows == "("
            or word.lower() in _KEYWORDS
            or "$" in text[match.start() - 1 : match.start()]
        ):
            continue
        names.add(word)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum(whepfan_viewers{instance=~"$instance"})', {"whepfan_viewers"}),
        (
            "sum by (instance, le) (rate(a_bucket{x='}'}[$__rate_interval])) / "
            "clamp_min(sum without (worker) (b_total[5m] offset 1h), 1e3) > bool 0",
            {"a_bucket", "b_total"},
        ),
        ("histogram_quantile(0.95, sum by (le) (rate(h_bucket[1m])))", {"h_bucket"}),
        ("up == 0 and on (instance) c:recorded:rate5m < +Inf", {"up", "c:recorded:rate5m"}),
        ("label_values(whepfan_workers, instance)", {"whepfan_workers"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


@pytest.fixture(scope="module")
def exported() -> Iterator[set[str]]:
    """The sample names (``_total``, ``_bucket`` ... included) of a live server's /metrics."""
    server: LiveServer = live_server()
    try:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
            text = response.read().decode("utf-8")
    finally:
        server.close()
    yield {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_every_query_names_a_metric_whepfan_exports(exported: set[str]) -> None:
    queries = _queries(_dashboard())
    assert len(queries) >= 20
    for expr in queries:
        names = metric_names(expr)
        assert names, f"{expr!r} selects no metric"
        assert names <= exported, f"{expr!r}: {sorted(names - exported)} not in /metrics"


def test_the_dashboard_shows_what_operators_watch() -> None:
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for wanted in (
        "Viewers per worker",
        "Egress bits/s",
        "Loss",
        "Receive delay per worker",
        "Refusals by reason",
        "Workers",
    ):
        assert wanted in titles
    by_title = {p["title"]: p for p in panels}
    refusals = by_title["Refusals by reason"]["targets"][0]["expr"]
    assert "by (reason)" in refusals and "whepfan_admission_refusals_total" in refusals
    delay = by_title["Receive delay per worker"]
    # The threshold the server itself acts on (0.1 s: worker_behind).
    steps = delay["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert {"color": "red", "value": 0.1} in steps
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
        assert panel["description"], panel["title"]
    # Every panel's variables are ones the dashboard defines.
    defined = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(dashboard["panels"])))
    assert used <= defined, used - defined


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["title"]
