"""The browser tracker (GET /v1/tracker.js) in a real headless Chromium, on a shop page served by the
service itself, posting to POST /v1/events on the real broker + Redis: an element scrolled into view
for a second yields one impression (not one seen for less), a real click yields one click, leaving the
page flushes the batch by beacon, and retries (a 503 before the collector, an answer lost after it
wrote) double nothing on livecopy.events."""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import orjson
import pytest
import redis
from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse

from core.settings import CollectorSettings, PublishableKey, Settings
from core.wire import Topics
from livecopy.devstack import free_port
from services.api.app import create_app
from services.api.events import events_extension
from stream.access.shopper_token import sign_shopper_token
from stream.collector.store import CollectorStore
from stream.redis_io import async_redis_client
from tests.copygen import ServerThread
from tests.integration.cdp import Browser, poll
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

PK = "lcpk_browser"
SECRET = "browser-site-secret-0123456789abcdef"
USER = "shopper-7"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def shop_page(app: FastAPI) -> None:
    """The site: its backend signs the shopper's token and puts the copy's ids on the element."""

    @app.get("/shop", response_class=HTMLResponse)
    async def shop(copy: str = Query(...), top: int = Query(0)) -> str:
        token = sign_shopper_token(SECRET, USER, 600)
        pad = "" if top else '<div style="height:2000px">top of the page</div>'
        return f"""<!doctype html><html><head><title>shop</title></head><body style="margin:0">
{pad}
<p id="copy" style="height:120px;margin:0" data-livecopy-copy="{html.escape(copy)}" data-livecopy-product="sku-1"
   data-livecopy-slot="pdp">Made for slow Sunday mornings.</p>
<div style="height:2000px">bottom</div>
<script src="/v1/tracker.js" data-key="{PK}" data-token="{token}" data-flush-ms="600000" data-beacon-retry-ms="1500"
        async></script>
</body></html>"""


class Faults:
    """The service behind a switch: the next POST /v1/events answered 503 before the collector sees it
    (``refuse``), or handled by the collector and its answer replaced by a 503 (``lose``); every
    POST's event ids recorded."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.refuse = 0
        self.lose = 0
        self.posts: list[tuple[str, list[str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/events":
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        ids = [e.get("event_id") for e in orjson.loads(body)]

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        origin = dict(scope["headers"]).get(b"origin", b"")
        failure = [(b"content-type", b"application/json"), (b"access-control-allow-origin", origin)]
        if self.refuse:
            self.refuse -= 1
            self.posts.append(("refused", ids))
            await send({"type": "http.response.start", "status": 503, "headers": failure})
            await send({"type": "http.response.body", "body": b'{"error": "unavailable"}'})
            return
        if self.lose:
            self.lose -= 1
            self.posts.append(("lost", ids))

            async def swallow(msg: Message) -> None:
                pass

            await self.app(scope, replay, swallow)  # written by the collector; the page never hears it
            await send({"type": "http.response.start", "status": 503, "headers": failure})
            await send({"type": "http.response.body", "body": b'{"error": "unavailable"}'})
            return
        self.posts.append(("passed", ids))
        await self.app(scope, replay, send)


class Served(ServerThread):
    """ServerThread on a port chosen before the app (the page's origin is in the key's allowlist)."""

    def __init__(self, app: Any, port: int) -> None:
        super().__init__(app)
        self.port = port
        self.server.config.port = port


def record_served(settings: Settings, *copies: str) -> None:
    async def run() -> None:
        client = async_redis_client(settings.redis)
        try:
            store = CollectorStore(client, settings.redis.key_prefix, settings.collector)
            for c in copies:
                await store.record_served(USER, c, int(time.time() * 1000))
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_tracker_in_headless_chromium(settings: Settings) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    col = CollectorSettings(publishable_keys={PK: PublishableKey(site="shop", origins=[origin])},
                            site_secrets={"shop": SECRET})
    s = settings.model_copy(update={"collector": col, "api": settings.api.model_copy(update={"auth": "keys"})})
    record_served(s, "copy-a", "copy-b")  # as GET /v1/copy records what it serves
    app = Faults(create_app(s, extensions=[events_extension(s), shop_page]))
    r = redis.Redis.from_url(s.redis.url)
    written_key = f"{s.redis.key_prefix}{{{USER}}}:collected"

    def written() -> set[str]:
        return {m.decode() for m in cast(list[bytes], r.zrange(written_key, 0, -1))}

    def pending(b: Browser) -> list[dict[str, Any]]:
        return list(b.js("window.livecopy.pending()") or [])

    with Served(app, port), Browser() as b:
        # -- page 1: below the fold, seen too briefly, then for a second; a click; leaving the page
        b.navigate(f"{origin}/shop?copy=copy-a")
        b.wait_js("window.livecopy && window.livecopy.user === 'shopper-7'", what="the tracker to load")
        time.sleep(1.3)
        assert pending(b) == []  # below the fold: nothing
        b.js("document.getElementById('copy').scrollIntoView({block: 'center'})")
        time.sleep(0.4)
        b.js("window.scrollTo(0, 0)")  # gone before the second was up
        time.sleep(1.3)
        assert pending(b) == []
        b.js("document.getElementById('copy').scrollIntoView({block: 'center'})")
        imp = poll(lambda: pending(b), 5, "the impression")
        assert [(e["type"], e["copy_id"], e["user_id"], e["product_id"], e["slot"]) for e in imp] == \
            [("impression", "copy-a", USER, "sku-1", "pdp")]
        time.sleep(1.5)
        assert len(pending(b)) == 1  # still in view: still one impression
        b.click("#copy")
        b.click("#copy")
        events = pending(b)
        assert [e["type"] for e in events] == ["impression", "click"]
        assert events[0]["impression_id"] == events[1]["impression_id"]
        assert app.posts == []  # batched: nothing sent yet (flush every 10 minutes)
        page1 = {e["event_id"] for e in events}
        b.navigate(f"{origin}/shop?copy=copy-b&top=1")  # pagehide: the batch leaves by beacon
        poll(lambda: app.posts, 10, "the beacon")
        assert app.posts[0] == ("passed", [e["event_id"] for e in events])
        poll(lambda: written() >= page1, 10, "page 1's events written")

        # -- page 2 (copy-b at the top): page 1's beaconed events are confirmed by fetch (answered duplicate, not
        # written again); a 503 before the collector, then an answer lost after the collector wrote: retried
        # with the same event ids, nothing doubled
        app.refuse = 1
        poll(lambda: b.js("document.getElementById('copy').getAttribute('data-livecopy-impression')"), 5,
             "the impression of copy-b (at the top of the page)")
        poll(lambda: b.js("window.livecopy.flush(), window.livecopy.pending().length === 0"), 20,
             "page 1's confirmation and copy-b's impression acknowledged")
        assert [o for o, _ in app.posts[:2]] == ["passed", "refused"]
        retried = app.posts[1][1]
        assert any(o == "passed" and set(retried) <= set(ids) for o, ids in app.posts[2:])
        assert written() >= page1 and len(written()) == 3  # confirmed, not written again
        app.lose = 1
        b.click("#copy")
        poll(lambda: b.js("window.livecopy.flush(), window.livecopy.pending().length === 0"), 20,
             "the click on copy-b acknowledged")
        lost = [ids for o, ids in app.posts if o == "lost"]
        assert len(lost) == 1 and [ids for o, ids in app.posts if o == "passed"][-1] == lost[0]
        b.navigate("about:blank")
    topics = Topics.from_settings(s.topics)
    records = read_topic(s, topics.events, 4)
    on_topic = [orjson.loads(m.value() or b"") for m in records]
    assert {m.key() for m in records} == {USER.encode()}
    assert sorted((e["type"], e["copy_id"]) for e in on_topic) == \
        [("click", "copy-a"), ("click", "copy-b"), ("impression", "copy-a"), ("impression", "copy-b")]
    assert len({e["event_id"] for e in on_topic}) == 4  # each once, however often it was sent
    sent = [i for _, ids in app.posts for i in ids]
    assert len(sent) >= 2 * 4  # every event went at least twice (beacon + confirmation, or a retry)
