"""``livecopy worker profile|catalog|generator|feedback|responses|trainer``: the long-running stream workers."""

from __future__ import annotations

import click

from livecopy.cli.base import Ctx, pass_ctx


@click.group()
def worker() -> None:
    """Long-running stream workers."""


@worker.command("profile")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--max-batch", type=int, default=None, help="Records per batch (1 = one Redis round trip per event).")
@pass_ctx
def worker_profile(ctx: Ctx, metrics_port: int | None, max_batch: int | None) -> None:
    """Consume events and keep per-user profiles in Redis."""
    from services.workers.profile import run_profile_worker

    run_profile_worker(ctx.settings, max_batch=max_batch, metrics_port=metrics_port)


@worker.command("catalog")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_catalog(ctx: Ctx, metrics_port: int | None) -> None:
    """Consume the compacted catalog topic into the Redis catalog the copy service reads."""
    from services.workers.catalog import run_catalog_worker

    run_catalog_worker(ctx.settings, metrics_port=metrics_port)


@worker.command("generator")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_generator(ctx: Ctx, metrics_port: int | None) -> None:
    """Pre-generate copy into the cache on product views (same engine and cache as the API)."""
    from services.workers.generator import run_generator_worker

    ctx.apply_torch_threads()
    run_generator_worker(ctx.settings, metrics_port=metrics_port)


@worker.command("feedback")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_feedback(ctx: Ctx, metrics_port: int | None) -> None:
    """Join impressions and clicks into labelled feedback (livecopy.feedback) + CTR aggregates in Redis."""
    from services.workers.feedback import run_feedback_worker

    run_feedback_worker(ctx.settings, metrics_port=metrics_port)


@worker.command("responses")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_responses(ctx: Ctx, metrics_port: int | None) -> None:
    """Keep each shopper's response to copy styles (clicks vs predicted, from livecopy.feedback) in Redis."""
    from services.workers.responses import run_responses_worker

    run_responses_worker(ctx.settings, metrics_port=metrics_port)


@worker.command("trainer")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_trainer(ctx: Ctx, metrics_port: int | None) -> None:
    """Fine-tune the student on livecopy.feedback; publish gated versions to livecopy.model-updates."""
    ctx.apply_torch_threads()
    from services.workers.trainer import run_trainer_worker

    run_trainer_worker(ctx.settings, metrics_port=metrics_port)


COMMANDS = [worker]
