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


def compose_binary() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return ["docker", "compose"]
    for name in ("docker-compose-v2", "docker-compose"):
        path = shutil.which(name)
        if path and "v2" in subprocess.run([path, "version"], capture_output=True, text=True, check=False).stdout:
            return [path]
    return None


def test_compose_file_is_valid() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 client on this machine (deploy/test.sh builds one)")
    proc = subprocess.run([*binary, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
