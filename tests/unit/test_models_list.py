"""`livecopy models list`: the shipped base version is listed (and marked serving while the registry is empty)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from livecopy.cli import cli, register
from models.paths import shipped_student_dir
from models.registry import Registry

SHIPPED = json.loads((shipped_student_dir() / "livecopy.json").read_text())["version"]


def _list(env: dict[str, str], *args: str) -> str:
    register(cli)
    res = CliRunner().invoke(cli, ["models", "list", *args], env=env)
    assert res.exit_code == 0, res.output
    return res.output


def test_an_empty_registry_lists_the_shipped_base_as_serving(tmp_path: Path) -> None:
    out = _list({"LIVECOPY_TRAINER__REGISTRY_DIR": str(tmp_path)})
    line = next(ln for ln in out.splitlines() if ln.startswith("*"))
    assert line.split()[1] == SHIPPED and "shipped" in line.split()
    assert f"shipped base {SHIPPED} serves" in out and "no versions" not in out
    data = json.loads(_list({"LIVECOPY_TRAINER__REGISTRY_DIR": str(tmp_path)}, "--json"))
    assert data["current"] is None and data["versions"] == []
    assert data["base"]["version"] == SHIPPED and data["base"]["status"] == "shipped"
    assert Path(data["base"]["path"]).resolve() == shipped_student_dir().resolve()


def test_registry_versions_are_listed_after_the_base(tmp_path: Path) -> None:
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "livecopy.json").write_text(json.dumps({"name": "livecopy-student", "version": "0.9.0",
                                                    "created_at": "2026-01-01T00:00:00Z", "metrics": {}}))
    reg = Registry(tmp_path / "registry", "livecopy-student")
    reg.import_base(base, "0.9.0")
    env = {"LIVECOPY_TRAINER__REGISTRY_DIR": str(tmp_path / "registry"), "LIVECOPY_TRAINER__BASE_DIR": str(base)}
    lines = _list(env).splitlines()
    assert lines[1].split()[:4] == ["0.9.0", "-", "base", "2026-01-01T00:00:00"]  # not serving: no *
    assert lines[2].strip() == f"(base: {base})"
    assert lines[3].split()[:3] == ["*", "0.9.0", "-"]  # the registry's copy of it serves
    data = json.loads(_list(env, "--json"))
    assert data["current"] == "0.9.0" and data["base"]["status"] == "base"
