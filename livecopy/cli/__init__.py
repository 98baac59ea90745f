"""The `livecopy` command line: one module per command group, registered on the root group here."""

from __future__ import annotations

import click

from livecopy.cli.base import Ctx, cli, pass_ctx

__all__ = ["Ctx", "cli", "main", "pass_ctx", "register"]


def register(root: click.Group) -> click.Group:
    """Add every command group to ``root`` (each name once: a second module defining one is a bug)."""
    from livecopy.cli import catalog, contracts, keys, models, serve, sim, stream, workers

    for module in (stream, workers, serve, keys, models, sim, catalog, contracts):
        for cmd in module.COMMANDS:
            if cmd.name in root.commands and root.commands[cmd.name] is not cmd:
                raise RuntimeError(f"two commands named {cmd.name!r}")
            root.add_command(cmd)
    return root


def main() -> None:
    register(cli)(prog_name="livecopy")


if __name__ == "__main__":
    main()
