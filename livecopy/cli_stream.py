"""Commands of the streaming side: dev stack, producers, workers, profiles."""

from __future__ import annotations

import click


def commands() -> list[click.Command]:
    return []
