"""The layout's dependency rule, read from the code: core <- {stream, models} <- engine <- services <- livecopy;
stream and models never import each other; nothing imports the CLI; importing stream never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "stream", "models", "engine", "services", "livecopy")
# what each top-level package may import (besides itself and third-party code)
ALLOWED = {
    "core": set(),
    "stream": {"core"},
    "models": {"core"},
    "engine": {"core", "stream", "models"},
    "services": {"core", "stream", "models", "engine"},
    "livecopy": {"core", "stream", "models", "engine", "services"},
}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "shipped" not in p.parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, also those inside functions; relative
    imports resolved against the file's package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in modules(package):
        for line, mod in imports_of(path):
            top = mod.split(".")[0]
            if top in LAYERS and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {package} must not import {mod}")
            cli_users = ("livecopy/cli/", "livecopy/__main__.py", "livecopy/sim/demo.py")
            where = path.relative_to(ROOT).as_posix()
            if mod.split(".")[:2] == ["livecopy", "cli"] and not where.startswith(cli_users):
                bad.append(f"{path.relative_to(ROOT)}:{line}: only the CLI (and the demo it runs) imports {mod}")
    return bad


def test_every_import_points_down_the_layers() -> None:
    bad = [v for package in LAYERS for v in violations(package)]
    assert not bad, "imports against the layout rule:\n" + "\n".join(bad)


def test_the_rule_test_sees_a_bad_import(tmp_path: Path) -> None:
    probe = ROOT / "stream" / "_layout_probe.py"
    probe.write_text("def f():\n    from engine.serving import CopyEngine\n    return CopyEngine\n")
    try:
        assert violations("stream") == ["stream/_layout_probe.py:2: stream must not import engine.serving"]
    finally:
        probe.unlink()


def test_importing_any_stream_module_does_not_load_torch() -> None:
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in modules("stream")]
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n    importlib.import_module(n)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy.linalg.torch') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing stream loaded {out.stdout.strip()}"
    assert len(names) >= 10  # it did import the package's modules


def calls(package_files: list[Path], attr: str) -> list[str]:
    """``file:line`` of every call of ``<something>.attr(...)`` in the files."""
    out = []
    for path in package_files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


PRODUCT = [p for package in LAYERS for p in modules(package)]


def test_one_redis_client_factory() -> None:
    """Every Redis client of the product comes from stream.redis_io (one place sets the timeouts and the pool)."""
    made = calls(PRODUCT, "from_url") + [c for c in calls(PRODUCT, "Redis")]
    assert made and all(c.startswith("stream/redis_io.py:") for c in made), made


def test_one_consume_loop() -> None:
    """Group consumers are read by BatchLoop alone; the model-update follower (every process reads every
    record, by assignment, no group) is the one other reader."""
    readers = calls(PRODUCT, "consume") + [c for c in calls(PRODUCT, "poll") if "kafka_io" in c or "model_updates" in c]
    assert {c.split(":")[0] for c in readers} == {"stream/kafka_io.py", "stream/model_updates.py"}, readers


def test_one_serve_and_each_command_name_once() -> None:
    import click

    from livecopy.cli import register

    root = register(click.Group("livecopy"))
    assert "serve" in root.commands and "worker" in root.commands
    worker = root.commands["worker"]
    assert isinstance(worker, click.Group)
    assert set(worker.commands) == {"profile", "catalog", "generator", "feedback", "responses", "trainer"}
    defined = [c for c in calls(modules("livecopy"), "command") if c.startswith("livecopy/cli/")]
    assert defined  # the commands are defined in livecopy/cli alone
    assert not [c for c in calls(PRODUCT, "command") if not c.startswith("livecopy/cli/")]


def test_api_and_generator_worker_make_copies_through_one_flow() -> None:
    users = {p.relative_to(ROOT).as_posix() for p in PRODUCT
             if "CopyFlow(" in p.read_text() and p.name != "copyflow.py"}
    assert users == {"services/api/copy.py", "services/workers/generator.py"}
    for name in ("services/api/copy.py", "services/workers/generator.py"):
        assert "context_from_profile" not in (ROOT / name).read_text()  # the request is built in the flow alone
