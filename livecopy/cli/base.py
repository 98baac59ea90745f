"""The `livecopy` command line.

Settings are read once here (`core.settings.load_settings`) and handed to each command;
heavy modules (torch, transformers, the Kafka clients) are imported inside the commands so
`livecopy --help` stays instant.
"""

from __future__ import annotations

import logging
import sys

import click
from pydantic import ValidationError

from core.settings import Settings, UnknownSetting, load_settings


class Ctx:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def apply_torch_threads(self) -> None:
        """Size torch's thread pools by ``models.torch_threads`` (0: torch's default), for model commands."""
        n = self.settings.models.torch_threads
        if n:
            import torch

            torch.set_num_threads(n)
            try:
                torch.set_num_interop_threads(n)
            except RuntimeError:  # already set (parallel work has started)
                pass


pass_ctx = click.make_pass_decorator(Ctx)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group()
@click.option("--env-file", type=click.Path(dir_okay=False), default=None,
              help="Read LIVECOPY_* settings from this file.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING, ...")
@click.pass_context
def cli(ctx: click.Context, env_file: str | None, log_level: str | None) -> None:
    """livecopy: real-time copy personalization on Kafka and Redis."""
    try:
        settings = load_settings(env_file)
    except (UnknownSetting, ValidationError) as exc:  # stop before anything starts, naming the key
        raise click.ClickException(str(exc)) from exc
    _configure_logging(log_level or settings.log_level)
    ctx.obj = Ctx(settings)


