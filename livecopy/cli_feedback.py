"""Commands of the feedback loop: ``livecopy worker feedback`` (the joiner), ``livecopy worker
responses`` (each shopper's style response), ``livecopy worker trainer`` (online
fine-tuning) and ``livecopy models list|promote|rollback`` (the registry).

``promote`` and ``rollback`` change the registry's serving pointer and announce the version on
``livecopy.model-updates`` (``--no-announce`` to only change the registry), so every running
generator swaps to it; a running trainer continues from it at its next evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from livecopy.cli import Ctx, pass_ctx


@click.command("feedback")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_feedback(ctx: Ctx, metrics_port: int | None) -> None:
    """Join impressions and clicks into labelled feedback (livecopy.feedback) + CTR aggregates in Redis."""
    from stream.feedback_worker import run_feedback_worker

    run_feedback_worker(ctx.settings, metrics_port=metrics_port)


@click.command("responses")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_responses(ctx: Ctx, metrics_port: int | None) -> None:
    """Keep each shopper's response to copy styles (clicks vs predicted, from livecopy.feedback) in Redis."""
    from stream.responses import run_responses_worker

    run_responses_worker(ctx.settings, metrics_port=metrics_port)


@click.command("trainer")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_trainer(ctx: Ctx, metrics_port: int | None) -> None:
    """Fine-tune the student on livecopy.feedback; publish gated versions to livecopy.model-updates."""
    ctx.apply_torch_threads()
    from stream.trainer_worker import run_trainer_worker

    run_trainer_worker(ctx.settings, metrics_port=metrics_port)


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

    from stream.kafka_io import producer_config
    from stream.trainer_worker import announce
    from stream.wire import Topics

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


_KEY_METRICS = ("heldout_n", "heldout_ctr_logloss", "parent_heldout_ctr_logloss", "kl_to_parent", "ope_snips",
                "ope_ips", "ope_logged_ctr")


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (versions, current, history).")
@pass_ctx
def models_list(ctx: Ctx, as_json: bool) -> None:
    """Versions with parent, status and held-out metrics; * marks the serving one."""
    reg = _registry(ctx)
    versions = reg.versions()
    cur = reg.current()
    if as_json:
        click.echo(json.dumps({"name": reg.name, "current": cur, "versions": [v.__dict__ for v in versions],
                               "history": reg.history()}, indent=2, default=str))
        return
    if not versions:
        click.echo(f"no versions of {reg.name} in {reg.root}")
        return
    click.echo(f"{'':1} {'version':24} {'parent':24} {'status':9} {'created':20} metrics")
    for v in versions:
        m = " ".join(f"{k}={v.metrics[k]:.4g}" if isinstance(v.metrics.get(k), float) else f"{k}={v.metrics[k]}"
                     for k in _KEY_METRICS if v.metrics.get(k) is not None)
        click.echo(f"{'*' if v.version == cur else ' '} {v.version:24} {v.parent_version or '-':24} {v.status:9} "
                   f"{v.created_at[:19]:20} {m}")


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


def commands() -> list[click.Command]:
    return [models_group]


def extend(worker_group: click.Group) -> None:
    """Add ``feedback``, ``responses`` and ``trainer`` to the ``livecopy worker`` group."""
    worker_group.add_command(worker_feedback)
    worker_group.add_command(worker_responses)
    worker_group.add_command(worker_trainer)
