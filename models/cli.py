"""Commands of the models area: train, eval."""

from __future__ import annotations

import click


def commands() -> list[click.Command]:
    return []
