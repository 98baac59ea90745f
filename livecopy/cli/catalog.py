"""``livecopy catalog load|show|stats``: a site's own products into livecopy (JSON lines or CSV)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from livecopy.cli.base import Ctx, pass_ctx


@click.group()
def catalog() -> None:
    """The product catalog the copy is written from (fields: docs/CONTRACTS.md, catalog section)."""


def _keys(ctx: Ctx) -> Any:
    from stream.copy_store import CopyKeys

    s = ctx.settings
    return CopyKeys(s.redis.key_prefix, s.generation.catalog_key)


@catalog.command("load")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--redis/--topic",
    "direct",
    default=False,
    help="--topic (default): publish to the catalog topic (the catalog worker keeps Redis from it); "
    "--redis: write Redis directly (one node, no catalog worker).",
)
@click.option("--allow-bad", is_flag=True, help="Exit 0 even when some rows were rejected.")
@pass_ctx
def catalog_load(ctx: Ctx, path: Path, direct: bool, allow_bad: bool) -> None:
    """Validate every row of PATH (JSON lines or one JSON array: .jsonl/.json/.ndjson; .csv with a header
    row), report each bad row with its reason, and load the good ones: to the compacted catalog topic
    keyed by product id (the catalog worker keeps Redis from it), or straight into Redis with --redis."""
    from core.catalog import Product
    from core.catalog_io import decode_product, parse_rows
    from core.wire import Rejection

    good: dict[str, Product] = {}
    bad = 0
    for line, row, err in parse_rows(path):
        try:
            if err is not None:
                raise Rejection("bad_format" if path.suffix.lower() == ".csv" else "not_json", err)
            p = decode_product(row)
        except Rejection as rej:
            bad += 1
            click.echo(f"line {line}: {rej.reason}: {rej.detail}", err=True)
            continue
        good[p.product_id] = p  # a later row of the same id wins, as on the topic
    if direct:
        from stream.copy_store import load_catalog
        from stream.redis_io import redis_client

        n = load_catalog(redis_client(ctx.settings.redis), _keys(ctx), good.values())
        where = f"Redis {_keys(ctx).catalog}"
    else:
        n = _publish(ctx, list(good.values()))
        from core.wire import Topics

        where = f"topic {Topics.from_settings(ctx.settings.topics).catalog}"
    click.echo(f"loaded {n} products into {where}; {bad} rows rejected", err=True)
    if bad and not allow_bad:
        sys.exit(1)


def _publish(ctx: Ctx, products: list[Any], deletes: tuple[str, ...] = ()) -> int:
    """Produce to the catalog topic and wait for every delivery report; returns how many were acked."""
    import orjson
    from confluent_kafka import Producer

    from core.wire import Topics
    from stream.kafka_io import ensure_topics, producer_config

    s = ctx.settings
    topics = Topics.from_settings(s.topics)
    ensure_topics(s.kafka, topics)
    producer = Producer(producer_config(s.kafka))
    failed: list[str] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(f"{(msg.key() or b'').decode()}: {err}")

    records = [(p.product_id, orjson.dumps(p.to_dict())) for p in products] + [(d, None) for d in deletes]
    for pid, value in records:
        while True:
            try:
                producer.produce(topics.catalog, key=pid.encode(), value=value, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
    left = producer.flush(60)
    if left or failed:
        for f in failed[:10]:
            click.echo(f"not delivered: {f}", err=True)
        raise click.ClickException(f"{left + len(failed)} of {len(records)} records were not acknowledged")
    return len(records)


@catalog.command("delete")
@click.argument("product_ids", nargs=-1, required=True)
@click.option("--redis", "direct", is_flag=True, help="Delete from Redis directly instead of a tombstone.")
@pass_ctx
def catalog_delete(ctx: Ctx, product_ids: tuple[str, ...], direct: bool) -> None:
    """Remove products: a tombstone per id on the catalog topic (or HDEL with --redis)."""
    if direct:
        from stream.redis_io import redis_client

        n = int(redis_client(ctx.settings.redis).hdel(_keys(ctx).catalog, *product_ids))
    else:
        n = _publish(ctx, [], product_ids)
    click.echo(f"deleted {n} products", err=True)


@catalog.command("show")
@click.argument("product_id")
@pass_ctx
def catalog_show(ctx: Ctx, product_id: str) -> None:
    """Print one product as livecopy holds it (JSON)."""
    from stream.redis_io import redis_client

    raw = redis_client(ctx.settings.redis).hget(_keys(ctx).catalog, product_id)
    if raw is None:
        click.echo(f"no product {product_id!r} in {_keys(ctx).catalog}", err=True)
        sys.exit(1)
    click.echo(json.dumps(json.loads(raw), ensure_ascii=False, indent=2))


@catalog.command("stats")
@pass_ctx
def catalog_stats(ctx: Ctx) -> None:
    """Products, categories, currencies, unrated and discounted products in the catalog."""
    from stream.copy_store import read_catalog
    from stream.redis_io import redis_client

    products = list(read_catalog(redis_client(ctx.settings.redis), _keys(ctx)))
    cats = Counter(p.category for p in products)
    out = {
        "products": len(products),
        "categories": dict(cats.most_common()),  # every category with its count, largest first
        "currencies": dict(Counter(p.currency for p in products).most_common()),
        "unrated": sum(1 for p in products if p.rating <= 0 or p.reviews <= 0),  # copy cites no rating for these
        "on_discount": sum(1 for p in products if p.discount_pct),
        "without_brand": sum(1 for p in products if not p.brand),
        "without_noun": sum(1 for p in products if not p.noun),
    }
    click.echo(json.dumps(out, ensure_ascii=False, indent=2))


COMMANDS = [catalog]
