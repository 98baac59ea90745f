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
