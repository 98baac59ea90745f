"""``livecopy serve``: the site-facing HTTP API (copy, profiles, health, metrics, dashboard)."""

from __future__ import annotations

import click

from livecopy.cli.base import Ctx, pass_ctx


@click.command()
@click.option("--host", default=None, help="Listen address (default api.host).")
@click.option("--port", type=int, default=None, help="Port (default api.port, 8080).")
@click.option("--no-copy", is_flag=True, help="Profiles only: no model, no GET /v1/copy.")
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None, no_copy: bool) -> None:
    """Run the HTTP API: GET /v1/copy, GET /v1/profile/{user_id}, /healthz, /metrics."""
    import uvicorn

    from core.process import tune_gc_for_latency
    from services.api.app import create_app
    from services.api.server import server_config

    s = ctx.settings
    extensions = []
    if not no_copy:
        from services.api.copy import copy_extension

        ctx.apply_torch_threads()
        extensions.append(copy_extension(s))
    from services.api.events import events_extension

    extensions.append(events_extension(s))  # POST /v1/events (the collector) and GET /v1/tracker.js
    app = create_app(s, extensions=extensions)
    tune_gc_for_latency()
    uvicorn.Server(server_config(app, s.api, host=host, port=port)).run()


COMMANDS = [serve]
