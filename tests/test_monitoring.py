"""monitoring/: the alert rules pass promtool's check and unit tests; the dashboard's queries
parse and name only metrics syncd exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from syncd.config import MetricsConfig
from syncd.ops.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)


def promtool(*args: str, cwd: Path = MONITORING) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def exported_names() -> set[str]:
    """Every sample name a daemon's registry exports (with a label on each family)."""
    metrics = Metrics()
    metrics.known_states(["received"])
    metrics.api_hook("katana")("GET", "/x", 200, 0.1)
    metrics.transition("a", "b", "t", None)
    metrics.state_duration.labels("default", "a").observe(1)
    metrics.effect("e", "retry")
    metrics.effect("e", "failed")
    metrics.last_poll.labels("default", "katana").set(1)
    metrics.rate_limit_remaining.labels("default", "katana").set(1)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def rule_queries() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses the expression of every recording rule it checks.
    rules: dict[str, Any] = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": expr.replace("$job", ".*").replace("$factory", ".*"),
                    }
                    for i, expr in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "dashboard.yml", cwd=tmp_path)


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    exported = exported_names() | {"up"}
    used = {
        name
        for expr in dashboard_queries() + rule_queries()
        for name in re.findall(r"\b(syncd_[a-z_]+|up)\b", expr)
    }
    assert used - exported == set()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in (
        "by state",
        "flow rate",
        "lag",
        "errors and 429s",
        "inbox backlog",
        "webhook",
        "paused",
    ):
        assert topic in titles


@needs_promtool
def test_example_scrape_config_passes_promtool_and_matches_the_rules() -> None:
    # promtool also loads and checks every rule file the config names.
    checked = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in checked
    rules = sum(
        len(g["rules"]) for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    )
    assert f"SUCCESS: {rules} rules found" in checked
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "syncd"
    # The job every rule selects is this one.
    jobs = {name for expr in rule_queries() for name in re.findall(r'job="([^"]+)"', expr)}
    assert jobs == {"syncd"}
    # The target is where a daemon with the default config serves /metrics.
    host, port = MetricsConfig().address()
    assert job["static_configs"] == [{"targets": [f"{host}:{port}"]}]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_the_dashboard_selects_factories_and_the_alerts_fire_per_factory() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    factory = variables["factory"]
    assert factory["includeAll"] and factory["multi"]
    assert factory["query"]["query"] == 'label_values(syncd_orders{job=~"$job"}, factory)'
    # Every selector of a syncd series follows the selector (up has no factory label, nor
    # the API latency: its service host's, shared by the factories).
    for expr in dashboard_queries():
        for name, selector in re.findall(r"\b(syncd_[a-z_]+)\{([^}]*)\}", expr):
            per_factory = name != "syncd_api_request_duration_seconds_bucket"
            assert ('factory=~"$factory"' in selector) == per_factory, expr
    # An aggregating rule keeps the factory: one factory's trouble is its own alert.
    for expr in rule_queries():
        for kept in re.findall(r"\bby \(([^)]*)\)", expr):
            assert "factory" in kept.split(", "), expr
    # And what a daemon exports carries the label.
    metrics = Metrics()
    metrics.known_states(["received"], factory="north")
    text = generate_latest(metrics.registry).decode()
    assert 'syncd_orders{factory="north",state="received"} 0.0' in text
