"""``livecopy dev``, ``topics``, ``produce``, ``loadgen`` and ``profile``: the stack and the event side."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from livecopy.cli.base import Ctx, pass_ctx

if TYPE_CHECKING:
    from livecopy.devstack import EmbeddedStack


# -- livecopy dev up|down|status --------------------------------------------------------------
@click.group()
def dev() -> None:
    """The dev stack on loopback, no Docker needed: Apache Kafka (KRaft; Java 17+) or tansu, and Redis."""


def _stack(ctx: Ctx, kafka_port: int | None, redis_port: int | None, data_dir: str | None,
           broker: str | None = None) -> EmbeddedStack:
    from livecopy.devstack import EmbeddedStack

    cfg = ctx.settings.dev
    upd = {k: v for k, v in {"kafka_port": kafka_port, "redis_port": redis_port, "broker": broker,
                             "data_dir": Path(data_dir) if data_dir else None}.items() if v is not None}
    return EmbeddedStack(cfg.model_copy(update=upd))


_port_opts = [
    click.option("--kafka-port", type=int, default=None, help="Broker port (default 9092)."),
    click.option("--redis-port", type=int, default=None, help="Redis port (default 6379)."),
    click.option("--data-dir", default=None, help="Pids, logs and Redis data (default .livecopy/dev)."),
]


def _with_ports(f: Any) -> Any:
    for opt in reversed(_port_opts):
        f = opt(f)
    return f


@dev.command("up")
@_with_ports
@click.option("--broker", type=click.Choice(["auto", "kafka", "tansu"]), default=None,
              help="Apache Kafka (KRaft, from Maven Central jars, data kept on disk; needs Java 17+) or the "
                   "embedded tansu (in memory); default dev.broker, auto: kafka when Java is found.")
@pass_ctx
def dev_up(ctx: Ctx, kafka_port: int | None, redis_port: int | None, data_dir: str | None,
           broker: str | None) -> None:
    """Start the broker and Redis, wait until both answer, create the topics."""
    from livecopy.devstack import StackError

    try:
        stack = _stack(ctx, kafka_port, redis_port, data_dir, broker)
        info = stack.up(ctx.settings.topics)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kafka  {info.bootstrap_servers}  ({info.details['broker']})")
    click.echo(f"redis  {info.redis_url}  (redis {info.details['redis']})")
    click.echo(f"data   {info.details['data_dir']}")
    if (stack.cfg.kafka_port, stack.cfg.redis_port) != (9092, 6379):
        click.echo("\nPoint livecopy at it with:")
        click.echo(f"  export LIVECOPY_KAFKA__BOOTSTRAP_SERVERS={info.bootstrap_servers}")
        click.echo(f"  export LIVECOPY_REDIS__URL={info.redis_url}")


@dev.command("down")
@_with_ports
@pass_ctx
def dev_down(ctx: Ctx, kafka_port: int | None, redis_port: int | None, data_dir: str | None) -> None:
    """Stop the embedded broker and Redis."""
    _stack(ctx, kafka_port, redis_port, data_dir).down()
    click.echo("stopped")


@dev.command("status")
@_with_ports
@pass_ctx
def dev_status(ctx: Ctx, kafka_port: int | None, redis_port: int | None, data_dir: str | None) -> None:
    """Show whether the embedded broker and Redis run, and where."""
    st = _stack(ctx, kafka_port, redis_port, data_dir).status()
    for name in ("kafka", "redis"):
        s = st[name]
        click.echo(f"{name:6} {'running' if s['running'] else 'stopped':8} {s['address']}  pid={s['pid']}")
    if not (st["kafka"]["running"] and st["redis"]["running"]):
        sys.exit(1)


@click.group()
def topics() -> None:
    """Topics of CONTRACTS.md."""


@topics.command("create")
@pass_ctx
def topics_create(ctx: Ctx) -> None:
    """Create the livecopy topics that do not exist yet (partition counts from settings)."""
    from core.wire import Topics
    from stream.kafka_io import ensure_topics

    t = Topics.from_settings(ctx.settings.topics)
    created = ensure_topics(ctx.settings.kafka, t)
    for name, n in t.partition_counts().items():
        click.echo(f"{name:32} {n:3} partitions  {'created' if name in created else 'exists'}")


# -- producing --------------------------------------------------------------------------------
def raw_key(line: bytes) -> str | None:
    """The record key of a line sent as it is: its ``user_id`` when it is a JSON object that has one. Any
    line at all (not JSON, nested beyond the parser's depth limit, huge) gives an answer, never an error."""
    import orjson

    try:
        key = orjson.loads(line).get("user_id")  # orjson stops at 1,024 levels with a JSONDecodeError
    except (ValueError, AttributeError, RecursionError):
        return None
    return key if isinstance(key, str) else None


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option("--raw", is_flag=True, help="Send lines unvalidated (key = the line's user_id if any).")
@pass_ctx
def produce(ctx: Ctx, file: IO[bytes], raw: bool) -> None:
    """Publish JSON-lines events from FILE (or - for stdin) to the events topic."""
    from livecopy import EventProducer, InvalidEvent

    bad = 0
    with EventProducer(settings=ctx.settings) as p:
        for n, line in enumerate(file, 1):
            line = line.strip()
            if not line:
                continue
            if raw:
                p.send_raw(raw_key(line), line)
                continue
            try:
                p.send(line)  # the line as it is, once it passes the contract
            except InvalidEvent as exc:
                bad += 1
                click.echo(f"line {n}: {exc}", err=True)
    click.echo(f"sent {p.sent} event(s), {bad} invalid line(s) skipped")
    if bad:
        sys.exit(2)


@click.command()
@click.option("--rate", type=float, default=1000.0, show_default=True, help="Events per second.")
@click.option("--users", type=int, default=10_000, show_default=True)
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds (0: until Ctrl-C).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--products", type=int, default=2000, show_default=True, help="Catalog size.")
@pass_ctx
def loadgen(ctx: Ctx, rate: float, users: int, duration: float, seed: int, products: int) -> None:
    """Produce realistic shopping sessions at a fixed rate."""
    from core.catalog import Catalog
    from livecopy import EventProducer
    from livecopy.sim.loadgen import SessionGenerator, paced

    gen = SessionGenerator(Catalog.generate(products), users, seed=seed).events()
    started = time.monotonic()
    with EventProducer(settings=ctx.settings) as p:
        try:
            for n in paced(rate, duration or None):
                p.send(next(gen))
                if n and n % max(1, int(rate) * 5) == 0:
                    click.echo(f"{n} events, {n / (time.monotonic() - started):.0f}/s", err=True)
        except KeyboardInterrupt:
            pass
    click.echo(f"sent {p.sent} events in {time.monotonic() - started:.1f} s")


# -- profiles -------------------------------------------------------------------------------------
@click.group()
def profile() -> None:
    """Read user profiles."""


@profile.command("forget")
@click.argument("user_id")
@pass_ctx
def profile_forget(ctx: Ctx, user_id: str) -> None:
    """Forget a shopper: delete every Redis key of theirs (profile, dedupe marks, style responses, cached
    copies); a tombstone keeps re-delivered or replayed older events from bringing the profile back for
    the dedupe window. Kafka keeps their events until its retention (docs/durability.md)."""
    from core.contracts import is_user_id
    from stream.forget import forget
    from stream.redis_io import redis_client

    if not is_user_id(user_id):
        raise click.ClickException("user_id must be 1-128 chars of [A-Za-z0-9_.:@-]")
    done = forget(redis_client(ctx.settings.redis), ctx.settings, user_id, int(time.time() * 1000))
    click.echo(f"forgot {user_id}: {done.deleted} key(s) deleted; tombstone {done.tombstone} for "
               f"{ctx.settings.profile.dedupe_window_s} s")


@profile.command("show")
@click.argument("user_id")
@click.option("--json", "as_json", is_flag=True, help="Print the profile JSON of CONTRACTS.md.")
@pass_ctx
def profile_show(ctx: Ctx, user_id: str, as_json: bool) -> None:
    """Print USER_ID's profile."""
    from stream.profile.logic import render
    from stream.profile.store import RedisProfileStore
    from stream.redis_io import redis_client

    s = ctx.settings
    store = RedisProfileStore(redis_client(s.redis), s.profile, s.redis.key_prefix)
    state = store.load(user_id)
    if state is None:
        raise click.ClickException(f"no profile for user {user_id!r}")
    prof = render(user_id, state, s.profile)
    if as_json:
        click.echo(prof.model_dump_json(indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"profile {user_id} (version {prof.profile_version})", show_header=False)
    t.add_row("seen", f"{prof.first_seen} .. {prof.last_seen}")
    t.add_row("events", ", ".join(f"{k} {v}" for k, v in prof.event_counts.items()))
    t.add_row("affinity", "\n".join(f"{c}  {a:.3f}" for c, a in list(prof.category_affinity.items())[:10]))
    t.add_row("recent", ", ".join(prof.recent_products[:10]))
    t.add_row("cart / purchases", f"{prof.cart_value:.2f} / {prof.purchase_value:.2f}")
    Console().print(t)


# -- the API -----------------------------------------------------------------------------------
COMMANDS = [dev, topics, produce, loadgen, profile]
