"""Commands of the simulator: ``livecopy simulate`` and ``livecopy demo``."""

from __future__ import annotations

from pathlib import Path

import click

from livecopy.cli.base import Ctx, pass_ctx


@click.command()
@click.option("--url", default=None, help="Copy service base URL (default http://api.host:api.port).")
@click.option("--duration", type=float, default=120.0, show_default=True, help="Seconds to run.")
@click.option("--impressions", type=int, default=None, help="Stop after this many impressions.")
@click.option("--population", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Hidden population (YAML/JSON); default livecopy/sim/default_population.yaml.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--holdout", type=float, default=0.25, show_default=True,
              help="Share of shoppers served by the static student in-process (baselines); 0: none.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Sessions in flight.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/simulate", show_default=True)
@click.option("--no-live", is_flag=True, help="Log lines instead of the live terminal view.")
@click.option("--api-key", default=None, help="A key with the copy scope (not needed when the service runs open).")
@pass_ctx
def simulate(ctx: Ctx, url: str | None, duration: float, impressions: int | None, population: str | None, seed: int,
             holdout: float, concurrency: int, out: str, no_live: bool, api_key: str | None) -> None:
    """Simulated shoppers against the running services: copy via GET /v1/copy, events via the SDK."""
    from livecopy.sim.demo import SimOptions, run_simulation

    s = ctx.settings
    opt = SimOptions(url=url or f"http://{s.api.host}:{s.api.port}", duration_s=duration, impressions=impressions,
                     population=population, seed=seed, holdout_share=holdout, concurrency=concurrency,
                     live_view=not no_live, out_dir=Path(out), api_key=api_key)
    run_simulation(s, opt)


@click.command()
@click.option("--duration", type=float, default=None, help="Seconds of shopping (default 180; --short: 45).")
@click.option("--short", is_flag=True, help="CI mode: a short run with a short attribution window.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--population", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--holdout", type=float, default=0.25, show_default=True)
@click.option("--no-live", is_flag=True, help="Log lines instead of the live terminal view.")
@pass_ctx
def demo(ctx: Ctx, duration: float | None, short: bool, out: str, population: str | None, seed: int, holdout: float,
         no_live: bool) -> None:
    """Start the stack, every worker and the copy service, run the shoppers, plot CTR per policy."""
    from livecopy.sim.demo import run_demo

    run_demo(ctx.settings, duration_s=duration if duration is not None else (45.0 if short else 180.0),
             out_dir=Path(out), short=short, seed=seed, population=population, live_view=not no_live,
             holdout_share=holdout)


COMMANDS = [simulate, demo]
