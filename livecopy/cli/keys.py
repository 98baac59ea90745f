"""``livecopy keys create|list|revoke``: the API's keys (stored hashed in Redis; a key is shown once)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from livecopy.cli.base import Ctx, pass_ctx

if TYPE_CHECKING:
    from stream.access.keys import KeyStore


def _store(ctx: Ctx) -> KeyStore:
    from stream.access.keys import KeyStore
    from stream.redis_io import redis_client

    s = ctx.settings
    return KeyStore(redis_client(s.redis), s.redis.key_prefix)


@click.group()
def keys() -> None:
    """API keys and their scopes: copy (a site's servers), profile:read, admin (metrics, dashboard,
    OpenAPI), debug (a copy's features)."""


@keys.command("create")
@click.option("--name", required=True, help="Who holds it (e.g. shop-frontend).")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["copy", "profile:read", "admin", "debug"]), help="Repeat for several.")
@pass_ctx
def keys_create(ctx: Ctx, name: str, scopes: tuple[str, ...]) -> None:
    """Create a key; it is printed once (only its SHA-256 is stored)."""
    key, secret = _store(ctx).create(name, list(scopes))
    click.echo(f"created key {key.key_id} ({key.name}; {', '.join(key.scopes)}). Store it now, it is not shown again:",
               err=True)
    click.echo(secret)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def keys_list(ctx: Ctx, as_json: bool) -> None:
    """The keys: id, name, scopes, created, revoked (never the secret)."""
    found = _store(ctx).list()
    if as_json:
        click.echo(json.dumps([{"key_id": k.key_id, "name": k.name, "scopes": list(k.scopes),
                                "created_ms": k.created_ms, "revoked_ms": k.revoked_ms} for k in found]))
        return
    if not found:
        click.echo("no keys")
    for k in found:
        click.echo(f"{k.key_id}  {k.name:24} {','.join(k.scopes):32} {'revoked' if k.revoked_ms else 'active'}")


@keys.command("revoke")
@click.argument("key_id")
@pass_ctx
def keys_revoke(ctx: Ctx, key_id: str) -> None:
    """Revoke a key (every API process refuses it within 5 s)."""
    if not _store(ctx).revoke(key_id):
        raise click.ClickException(f"no active key {key_id!r}")
    click.echo(f"revoked {key_id}")


COMMANDS = [keys]
