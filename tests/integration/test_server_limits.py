"""The API's server bounds, through the server `livecopy serve` runs: a client that never finishes its
request is cut off at api.request_timeout_s; oversized headers are refused; a whole request is served."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from core.settings import ApiSettings, Settings
from services.api.app import create_app
from tests.copygen import ServerThread

pytestmark = pytest.mark.integration


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (None: still open after ``seconds``)."""
    sock.settimeout(0.2)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None


def test_a_request_that_never_arrives_whole_is_cut_off(settings: Settings) -> None:
    api = ApiSettings(request_timeout_s=1.0, keep_alive_s=30)
    with ServerThread(create_app(settings), api) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished ...
            for _ in range(4):  # ... but trickled: every byte used to restart uvicorn's keep-alive timer
                time.sleep(0.3)
                slow.sendall(b"X")
            closed = closed_within(slow, 5.0)
            assert closed is not None, "the connection of an unfinished request stayed open"
        with socket.create_connection(("127.0.0.1", port)) as idle:  # connects and sends nothing at all
            assert closed_within(idle, 5.0) is not None
        # a keep-alive connection serves whole requests one after another
        with httpx.Client(base_url=url) as http:
            for _ in range(3):
                assert http.get("/healthz").status_code == 200
                time.sleep(0.4)


def test_oversized_headers_are_refused(settings: Settings) -> None:
    with ServerThread(create_app(settings), ApiSettings(max_header_bytes=4096)) as url:
        r = httpx.get(url + "/healthz", headers={"X-Big": "a" * 8000})
        assert r.status_code in (400, 431)
        assert httpx.get(url + "/healthz", headers={"X-Small": "a" * 1000}).status_code == 200
