"""The set-up promises of the README, and the deploy files that cannot run here (checked, not run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    demo, tests = setup_commands()
    assert "llmpulse demo" in demo and "pip install" in demo
    assert tests == "bash deploy/test.sh"
    assert "deploy/test.sh" in (ROOT / ".ci" / "run").read_text()


COMPOSE_CHECK = ROOT / "deploy" / "compose-check" / "bin" / "compose-check"


def compose_command() -> list[str] | None:
    """`docker compose config` where a client exists, else compose-go (what Compose loads files with)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"]
    if not COMPOSE_CHECK.exists() and shutil.which("go"):
        subprocess.run(["go", "build", "-o", "bin/compose-check", "."], cwd=COMPOSE_CHECK.parents[1], check=True)
    if COMPOSE_CHECK.exists():
        return [str(COMPOSE_CHECK), str(ROOT / "docker-compose.yml")]
    return None


def test_compose_file_is_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither a Docker Compose client nor Go to build compose-check")
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_compose_check_rejects_an_invalid_file(tmp_path: Path) -> None:
    command = compose_command()
    if command is None or command[0] != str(COMPOSE_CHECK):
        pytest.skip("compose-check not in use")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    portz: [1]\n")
    proc = subprocess.run([str(COMPOSE_CHECK), str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "additional properties 'portz' not allowed" in proc.stderr


# ---- what docker-compose.yml brings up (compose-check validates the schema; these check the wiring) ----

COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"kafka", "clickhouse", "topics", "worker", "server", "prometheus", "alertmanager", "grafana", "demo"}


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the x-llmpulse anchor and `<<` merges
    return spec


def with_defaults(value: str) -> str:
    """`${VAR:-default}` as Compose resolves it when VAR is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_brings_up_the_whole_stack() -> None:
    services = compose()["services"]
    assert set(services) == SERVICES
    assert services["demo"]["profiles"] == ["demo"]  # only on `docker compose run --rm demo`
    for name in ("worker", "server", "topics", "demo"):  # one image for the CLI, worker and server
        assert services[name]["image"] == "llmpulse:local"
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert services["server"]["command"][:2] == ["serve", "--kafka"]
    assert services["worker"]["command"] == ["worker"]


def test_long_running_services_have_healthchecks_and_wait_for_what_they_need() -> None:
    services = compose()["services"]
    for name in SERVICES - {"topics", "demo"}:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"
    expected = {
        "worker": {"kafka": "service_healthy", "clickhouse": "service_healthy",
                   "topics": "service_completed_successfully"},
        "server": {"kafka": "service_healthy", "clickhouse": "service_healthy",
                   "topics": "service_completed_successfully"},
        "prometheus": {"alertmanager": "service_healthy"},
        "grafana": {"clickhouse": "service_healthy", "prometheus": "service_healthy"},
    }  # fmt: skip
    for name, needs in expected.items():
        assert {k: v["condition"] for k, v in services[name]["depends_on"].items()} == needs, name


def test_healthchecks_probe_the_ports_the_services_listen_on() -> None:
    from schemas.config import MetricsSettings

    services = compose()["services"]
    probes = {
        name: " ".join(services[name]["healthcheck"]["test"]) for name in services if "healthcheck" in services[name]
    }
    assert f"127.0.0.1:{MetricsSettings().port}/metrics" in probes["worker"]
    assert "127.0.0.1:8080/healthz" in probes["server"]
    assert "127.0.0.1:9090/-/ready" in probes["prometheus"]
    assert "127.0.0.1:9093/-/ready" in probes["alertmanager"]
    assert "127.0.0.1:3000/api/health" in probes["grafana"]
    assert "--port" in services["server"]["command"] and "8080" in services["server"]["command"]


def test_published_ports_are_on_loopback_only() -> None:
    published = {}
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host, _, container = port.rpartition(":")
            assert host.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
            published[name] = int(container)
    assert published == {"kafka": 9094, "clickhouse": 8123, "server": 8080, "prometheus": 9090,
                         "alertmanager": 9093, "grafana": 3000}  # fmt: skip


def test_every_mounted_file_and_secret_exists() -> None:
    spec = compose()
    mounts = []
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                mounts.append((name, source))
    for name, secret in spec["secrets"].items():
        mounts.append((name, with_defaults(secret["file"])))
    assert len(mounts) >= 8
    for name, source in mounts:
        assert (ROOT / source).exists(), f"{name}: {source} does not exist"
    for name, service in spec["services"].items():
        for secret in service.get("secrets", []):
            assert secret in spec["secrets"], f"{name}: undeclared secret {secret}"
    alertmanager = (ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text()
    for secret in spec["services"]["alertmanager"]["secrets"]:
        assert f"/run/secrets/{secret}" in alertmanager  # where Compose mounts it


def test_grafana_installs_the_clickhouse_plugin_and_provisions_from_the_mounts() -> None:
    grafana = compose()["services"]["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"].split(",")
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/llmpulse.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (ROOT / "deploy/grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/llmpulse.yml").read_text())
    by_type = {d["type"]: d for d in datasources["datasources"]}
    clickhouse = by_type["grafana-clickhouse-datasource"]["jsonData"]
    assert (clickhouse["host"], clickhouse["port"], clickhouse["protocol"]) == ("clickhouse", 8123, "http")
    used = set(re.findall(r"\$\{(\w+)\}", (ROOT / "deploy/grafana/provisioning/datasources/llmpulse.yml").read_text()))
    assert used <= set(grafana["environment"]), (
        f"provisioning reads unset variables: {used - set(grafana['environment'])}"
    )
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"


def test_prometheus_mounts_its_config_where_the_command_reads_it() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./deploy/prometheus/rules"] == "/etc/prometheus/rules"  # rule_files: rules/*.yml
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
