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
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
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
            if mod == "livecopy.cli" or mod.startswith("livecopy.cli."):
                if not path.relative_to(ROOT).as_posix().startswith(("livecopy/cli/", "livecopy/__main__.py", "livecopy/sim/demo.py")):
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
