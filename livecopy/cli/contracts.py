"""``livecopy contracts schemas``: the JSON Schemas of every topic's records (core.schemas), written or checked."""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_OUT = Path("docs/schemas")


@click.group("contracts")
def contracts_group() -> None:
    """The wire contracts (docs/CONTRACTS.md) as machine-readable JSON Schemas."""


@contracts_group.command("schemas")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Directory of the schema files (one per topic).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if a file differs from what would be generated.")
def schemas_cmd(out: Path, check: bool) -> None:
    """Generate one JSON Schema (draft 2020-12) per topic's record from the contract models."""
    from core.schemas import stale, write

    if check:
        bad = stale(out)
        if bad:
            raise click.ClickException(f"out of date in {out}: {', '.join(bad)} "
                                       f"(run `livecopy contracts schemas --out {out}`)")
        click.echo(f"{out}: up to date")
        return
    for p in write(out):
        click.echo(str(p))


COMMANDS = [contracts_group]
