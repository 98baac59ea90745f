"""Collects every area's subcommands under the root `livecopy` group."""

from __future__ import annotations

import click


def register(root: click.Group) -> None:
    from livecopy import cli_copy, cli_feedback, cli_sim, cli_stream
    from models import cli as models_cli

    # cli_copy's `serve` (profiles + copy) replaces cli_stream's
    for module in (cli_stream, models_cli, cli_copy, cli_sim, cli_feedback):
        for cmd in module.commands():
            root.add_command(cmd)
    cli_copy.extend(cli_stream.worker)
    cli_feedback.extend(cli_stream.worker)
