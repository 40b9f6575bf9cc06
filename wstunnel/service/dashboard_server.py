"""The metrics listener: Prometheus text, the dashboard page and its JSON.

Theory of operation
-------------------
A minimal HTTP/1.1 server (h11), one request per connection:

* ``GET /metrics``: the Prometheus text exposition;
* ``GET /`` (or ``/dashboard``): one self-contained page (dashboard_page.py:
  inline CSS and script, nothing fetched from anywhere else, which its
  Content-Security-Policy also enforces) that polls
* ``GET /api/status``: the JSON document of dashboard_status.py, rebuilt at most
  once per sample however many browsers poll.

With ``metrics_auth_file`` every path needs HTTP Basic credentials from that
file (dashboard_auth.py); a request without them gets 401 and a
``WWW-Authenticate`` challenge, so a browser asks for them. Each request is
bounded in size and time, and a slow client only holds its own task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, NoReturn

import h11
import trio

from ..security.policy import Listener, this_host
from .dashboard_auth import REALM, BasicAuth
from .dashboard_page import CONTENT_SECURITY_POLICY, PAGE
from .dashboard_status import DocumentCache
from .metrics_output import render_prometheus

if TYPE_CHECKING:
    from ..addresses import HostPort
    from .metrics import TunnelStats

__all__ = ["serve_metrics"]

log = logging.getLogger("wstunnel.metrics")

_PROMETHEUS: Final = b"text/plain; version=0.0.4; charset=utf-8"
_TEXT: Final = b"text/plain; charset=utf-8"
_HTML: Final = b"text/html; charset=utf-8"
_JSON: Final = b"application/json"
_REQUEST_TIMEOUT: Final = 10.0
_MAX_REQUEST_SIZE: Final = 16384
_PAGE: Final = PAGE.encode()

Response = tuple[int, bytes, bytes]  # status, content type, body


async def serve_metrics(
    stats: TunnelStats, address: HostPort, *, auth_file: str | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``/metrics``, the dashboard and ``/api/status`` on ``address`` until cancelled.

    ``task_status.started`` receives the bound (host, port) pairs.

    Raises:
        ConfigError: ``auth_file`` cannot be read or names no user.
    """
    auth = BasicAuth.load(auth_file) if auth_file is not None else None
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    log.info("metrics on %s, dashboard on %s%s",
             ", ".join(f"http://{h}:{p}/metrics" for h, p in bound),
             ", ".join(f"http://{h}:{p}/" for h, p in bound),
             " (Basic auth)" if auth else "")
    # A relay must not open channels to its own metrics (policy.py).
    own = [Listener.bound(host, port, "metrics port") for host, port in bound]
    this_host.add_listeners(own)
    try:
        async with trio.open_nursery() as nursery:
            handler = _handler(_Site(stats, auth))
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(bound)
    finally:
        this_host.remove_listeners(own)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


class _Site:
    """Routes one request to its answer; sync and cheap."""

    def __init__(self, stats: TunnelStats, auth: BasicAuth | None) -> None:
        self.stats = stats
        self.auth = auth
        self.document = DocumentCache(stats)

    def answer(self, request: h11.Request) -> Response:
        path = request.target.split(b"?", 1)[0]
        if self.auth is not None and not self.auth.allows(_header(request, b"authorization")):
            return 401, _TEXT, b"this dashboard needs a user and password (metrics_auth_file)\n"
        if request.method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"use GET /metrics, GET / or GET /api/status\n"
        if path == b"/metrics":
            return 200, _PROMETHEUS, render_prometheus(self.stats).encode()
        if path in (b"/", b"/dashboard"):
            return 200, _HTML, _PAGE
        if path == b"/api/status":
            return 200, _JSON, self.document.body()
        return 404, _TEXT, b"metrics are at /metrics, the dashboard at /, its data at /api/status\n"


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def _handler(site: _Site) -> Callable[[trio.SocketStream], Any]:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(_REQUEST_TIMEOUT):
                await _converse(stream, site)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics client went away: %s", exc)
        except Exception:  # (one request's bug must not end the relay or agent it watches)
            log.error("metrics request failed (a bug; please report it with this "
                      "traceback); that connection is closed", exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    return handle


async def _converse(stream: trio.SocketStream, site: _Site) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_SIZE)
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            await _respond(stream, connection, (400, _TEXT, b"bad request\n"))
            return
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Request):
            break
        else:
            return
    await _respond(stream, connection, site.answer(event), head=event.method == b"HEAD")


async def _respond(stream: trio.SocketStream, connection: h11.Connection, response: Response,
                   *, head: bool = False) -> None:
    status, content_type, body = response
    headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body)),
               (b"Cache-Control", b"no-store"), (b"X-Content-Type-Options", b"nosniff"),
               (b"Connection", b"close")]
    if content_type == _HTML:
        headers += [(b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"Referrer-Policy", b"no-referrer")]
    if status == 401:
        headers.append((b"WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode()))
    reason = HTTPStatus(status).phrase.encode()  # (h11 sends none unless given one)
    data = connection.send(h11.Response(status_code=status, headers=headers,
                                        reason=reason)) or b""
    if not head:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
