"""Commands of copy generation: ``livecopy serve`` (the API with GET /v1/copy) and
``livecopy worker generator``.

``serve`` here is the full site-facing API (profiles + copy); it is registered after
``livecopy.cli_stream`` in ``livecopy.commands`` and so takes the ``serve`` name over from the
profile-only one there.
"""

from __future__ import annotations

import click

from livecopy.cli import Ctx, pass_ctx


@click.command()
@click.option("--host", default=None, help="Listen address (default api.host).")
@click.option("--port", type=int, default=None, help="Port (default api.port, 8080).")
@click.option("--no-copy", is_flag=True, help="Profiles only: no model, no GET /v1/copy.")
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None, no_copy: bool) -> None:
    """Run the HTTP API: GET /v1/copy, GET /v1/profile/{user_id}, /healthz, /metrics."""
    import uvicorn

    from livecopy.runtime import tune_gc_for_latency
    from services.api import create_app

    s = ctx.settings
    extensions = []
    if not no_copy:
        from services.copy import copy_extension

        ctx.apply_torch_threads()
        extensions.append(copy_extension(s))
    app = create_app(s, extensions=extensions)
    tune_gc_for_latency()
    uvicorn.run(app, host=host or s.api.host, port=port or s.api.port, log_level="warning")


@click.command("generator")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def worker_generator(ctx: Ctx, metrics_port: int | None) -> None:
    """Pre-generate copy into the cache on product views (same engine and cache as the API)."""
    from stream.generator_worker import run_generator_worker

    ctx.apply_torch_threads()
    run_generator_worker(ctx.settings, metrics_port=metrics_port)


def commands() -> list[click.Command]:
    return [serve]


def extend(worker_group: click.Group) -> None:
    """Add ``generator`` to the ``livecopy worker`` group."""
    worker_group.add_command(worker_generator)
