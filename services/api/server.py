"""How ``livecopy serve`` runs the API app: uvicorn with bounds on what a client may hold. uvicorn's
keep-alive timer restarts on every byte, so a client trickling a request's headers byte by byte
could hold a connection forever; the protocol here gives every request a deadline to arrive whole
(``api.request_timeout_s``), and headers a size limit (``api.max_header_bytes``)."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.settings import ApiSettings

_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: the connection closes when a request has not arrived whole within
    ``request_timeout_s`` of the connection (or of the previous response)."""

    request_timeout_s = 10.0
    max_header_bytes = 16 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._head = bytearray()  # the bytes of a request whose headers have not ended yet
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            assert self._deadline is not None
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and self.conn.their_state not in _RECEIVED:
            self.logger.warning("closing a connection whose request did not arrive within %.0f s",
                                self.request_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._too_large(data):
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head.clear()
        if self.conn.their_state in _RECEIVED:
            self._disarm()

    def _too_large(self, data: bytes) -> bool:
        """Whether the request line and headers arriving now run past ``max_header_bytes`` (h11's own limit
        applies only to data buffered incomplete, so one large packet of headers would pass it)."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        size = len(self._head) if end < 0 else end + 4
        return size > self.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this keep-alive connection has its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app: Any, api: ApiSettings, *, host: str | None = None, port: int | None = None,
                  log_level: str = "warning") -> uvicorn.Config:
    protocol = type("Protocol", (DeadlineH11Protocol,), {"request_timeout_s": api.request_timeout_s,
                                                         "max_header_bytes": api.max_header_bytes})
    return uvicorn.Config(app, host=host or api.host, port=port or api.port, log_level=log_level, lifespan="on",
                          http=protocol, h11_max_incomplete_event_size=api.max_header_bytes,
                          timeout_keep_alive=int(api.keep_alive_s))
