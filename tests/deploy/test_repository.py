"""The set-up promises of the README, and the deploy files that cannot run here (checked, not run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
