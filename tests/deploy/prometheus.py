"""What Prometheus would scrape from llmpulse, for tests of the rules and dashboards.

The series come from the real registries (``sinks.metrics.PipelineMetrics`` in the worker, plus
``HttpMetrics`` in ``llmpulse serve``) after touching every metric once, rendered by
prometheus_client and parsed back, so the names and label sets are exactly the exported ones
(``_total``, ``_bucket``...). Metrics that are not ours are listed with where they come from.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from sinks.metrics import PipelineMetrics

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

THIRD_PARTY: dict[str, str] = {
    "up": "Prometheus, per scrape target",
    "alertmanager_notifications_total": "Alertmanager, per integration (pagerduty, webhook...)",
    "alertmanager_notifications_failed_total": "Alertmanager, per integration",
}
"""Metric names the rules and dashboards may use besides llmpulse's own."""

LABEL_VALUES = {
    "source": "kafka", "path": "$.input_tokens", "partition": "0", "rule": "error-rate-high",
    "state": "firing", "severity": "critical", "what": "alert", "route": "/v1/events", "status": "200",
    "tenant": "acme", "reason": "rate_limited", "outcome": "accepted", "gen_ai_operation_name": "chat",
    "gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-4o", "llmpulse_feature": "search",
    "gen_ai_token_type": "input",
}  # fmt: skip
"""Label values used to touch labelled metrics; dashboards filter on some of them (route)."""

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                       "bool", "offset", "inf", "nan"})  # fmt: skip


@dataclass(frozen=True)
class Series:
    name: str
    labels: dict[str, str]
    value: float

    def selector(self) -> str:
        inner = ", ".join(f'{k}="{_escape(v)}"' for k, v in sorted(self.labels.items()))
        return f"{self.name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _touch(owner: Any) -> None:
    """Give every metric of ``owner`` one child and one observation, as traffic would."""
    for metric in vars(owner).values():
        if isinstance(metric, MetricWrapperBase):
            names = getattr(metric, "_labelnames", ())
            child: Any = metric.labels(*(LABEL_VALUES.get(n, "x") for n in names)) if names else metric
            if isinstance(metric, Histogram):
                child.observe(0.05)
                child.observe(2.0)
            elif isinstance(metric, Gauge):
                child.set(7)
            else:
                child.inc(3)
        elif hasattr(metric, "buckets") and hasattr(metric, "labels"):  # the GenAI batch histograms
            values = [0.05, 2.0, 300.0]
            counts = [sum(1 for v in values if v <= b) for b in metric.buckets]
            metric.add(tuple(LABEL_VALUES.get(n, "x") for n in metric.labels), counts, len(values), sum(values))


def scraped(job: str) -> list[Series]:
    """The samples Prometheus stores for one scrape of ``job`` (``llmpulse-worker`` or ``llmpulse-server``)."""
    pipeline = PipelineMetrics()
    _touch(pipeline)
    instance = "worker:9464"
    if job == "llmpulse-server":
        from llmpulse.server import HttpMetrics  # the server serves both on one /metrics

        _touch(HttpMetrics(pipeline))
        instance = "server:8080"
    text = generate_latest(pipeline.registry).decode()
    return [
        Series(s.name, {**s.labels, "job": job, "instance": instance}, float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def exported_names() -> set[str]:
    return {s.name for job in ("llmpulse-worker", "llmpulse-server") for s in scraped(job)}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (in matchers or by/on lists), durations or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def input_series(series: Iterable[Series], steps: int = 40) -> list[dict[str, str]]:
    """promtool input series: counters and buckets grow at their scraped value per minute, gauges hold."""
    out = []
    for s in series:
        v = s.value
        grows = s.name.endswith(("_total", "_bucket", "_count", "_sum"))
        values = f"{v:g}+{v:g}x{steps}" if grows and v else f"{v:g}x{steps}"
        out.append({"series": s.selector(), "values": values})
    return out


def third_party_series() -> list[Series]:
    out = [Series("up", {"job": job, "instance": inst}, 1.0)
           for job, inst in (("llmpulse-worker", "worker:9464"), ("llmpulse-server", "server:8080"),
                             ("alertmanager", "alertmanager:9093"))]  # fmt: skip
    for name, value in (("alertmanager_notifications_total", 5.0), ("alertmanager_notifications_failed_total", 1.0)):
        for integration in ("pagerduty", "webhook"):
            out.append(Series(name, {"job": "alertmanager", "instance": "alertmanager:9093",
                                     "integration": integration}, value))  # fmt: skip
    return out


def run_promtool_expression_tests(exprs: dict[str, str], series: list[Series], workdir: Path) -> None:
    """Evaluate each expression offline with ``promtool test rules``; each must return at least one
    series (``count(expr)`` is then 1 after clamping). Raises with promtool's report otherwise."""
    assert PROMTOOL is not None
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series(series),
                "promql_expr_test": [
                    {
                        "expr": f"clamp_max(count({expr}), 1)",
                        "eval_time": "30m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    }
                    for expr in exprs.values()
                ],
            }
        ],
    }
    path = workdir / "panels_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        where = "\n".join(f"  {name}: {expr}" for name, expr in exprs.items())
        raise AssertionError(f"promtool test rules failed:\n{proc.stdout}\n{proc.stderr}\nexpressions:\n{where}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_alertmanager(config: Path, workdir: Path) -> Iterator[str]:
    """A real Alertmanager on a free loopback port with ``config``; yields its URL once ready.

    Raises with the end of its log if it does not come up within 10 s (e.g. the config is rejected).
    """
    assert ALERTMANAGER is not None
    port = free_port()
    log_path = workdir / "alertmanager.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={config}", f"--storage.path={workdir / 'alertmanager-data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    urllib.request.urlopen(url + "/-/ready", timeout=1).close()
                    break
                except OSError as exc:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"Alertmanager did not start:\n{log_path.read_text()[-2000:]}") from exc
                    time.sleep(0.05)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
