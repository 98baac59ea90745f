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
              type=click.Choice(["copy", "profile:read", "admin", "debug", "events"]), help="Repeat for several.")
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


@keys.command("shopper-token")
@click.option("--user", "user_id", required=True, help="The shopper's user id.")
@click.option("--site", default=None, help="Site whose secret signs it (default: the only one).")
@click.option("--ttl", "ttl_s", type=int, default=24 * 3600, show_default=True, help="Seconds until it expires.")
@pass_ctx
def keys_shopper_token(ctx: Ctx, user_id: str, site: str | None, ttl_s: int) -> None:
    """A signed shopper token: a page with it may report USER's events to POST /v1/events (a site's
    backend signs its own: stream/access/shopper_token.py gives the format)."""
    from stream.access.shopper_token import sign_shopper_token

    secrets = ctx.settings.collector.site_secrets
    if site is None:
        if len(secrets) != 1:
            raise click.ClickException(f"name the site (--site): collector.site_secrets has {len(secrets)}")
        site = next(iter(secrets))
    if site not in secrets:
        raise click.ClickException(f"no secret for site {site!r} in collector.site_secrets")
    try:
        click.echo(sign_shopper_token(secrets[site], user_id, ttl_s))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


COMMANDS = [keys]
