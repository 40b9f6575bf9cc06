"""One line for a person when the upgrade to the relay is refused or broken.

A refused upgrade is usually not the relay's doing: a reverse proxy without
the Upgrade headers forwards a plain GET (the relay answers 426, or 505 when
the proxy speaks HTTP/1.0), a captive portal or web server answers 200, a
strict front end answers 400, a firewall closes the connection. The answer's
``Server`` header names what really replied, so the line says who it was:
``the path to the relay does not pass WebSocket upgrades: got 426 Upgrade
Required from nginx/1.22.1 at wss://relay.example.com:443/tunnel — …``.

A 200 or 404 to an upgrade means a web server answered: the relay never
answers 200 to an upgrade, and its own 404 says where its tunnel is (relay.py
``route``), which tells "a relay, wrong path" from "not a relay at all".
"""

from __future__ import annotations

from typing import Final

from .. import ws
from ..ws._http import get_header, one_line

__all__ = ["explain_rejection", "brief", "BLOCKING_STATUSES"]

_NO_UPGRADE: Final = "the path to the relay does not pass WebSocket upgrades"
_WEB_SERVER: Final = ("this is a web server, not a wstunnel relay: check the relay URL's host, "
                      "port and path")
#: What the relay's own 404 says (relay.py ``route``): a relay, asked at the wrong path.
_RELAY_404: Final = b"the tunnel is at "
_WRONG_PATH: Final = ("a wstunnel relay answered, but its tunnel is at another path: check the "
                      "URL's path (the relay's --path, and any prefix a front end adds)")
#: What a draining relay's 503 begins with (relay/door.py ``DRAINING``).
_RELAY_DRAINING: Final = b"the relay is shutting down"
_DRAINING: Final = ("this relay is shutting down (its sessions finish there) and takes no new "
                    "session: the agent tries its next relay if it has one (list several "
                    "under relay:), and this one again with backoff until it is back")
_BODY_EXCERPT: Final = 100

#: Statuses that mean "an upgrade was turned into something else on the way".
_PATH_BREAKS: Final = {
    0: "a proxy or firewall on the path closed the connection, or this is not the relay's "
       "address",
    101: "something on the path answered the upgrade but not as a WebSocket server",
    400: "a proxy in front of the relay rejected the upgrade request, or forwarded it broken",
    426: "a proxy in front of the relay dropped the Upgrade and Connection headers "
         "(nginx: proxy_set_header Upgrade/Connection; see configs/)",
    505: "a proxy in front of the relay speaks HTTP/1.0 to it (nginx: proxy_http_version 1.1 "
         "and the Upgrade headers; see configs/)",
}

_OTHER: Final = {
    429: "the relay already holds max_sessions_per_agent sessions for this agent: is the "
         "same token in use on another machine, or an old agent still running?",
    200: _WEB_SERVER,
    404: _WEB_SERVER,
    502: "a proxy in front of the relay could not reach it: is the relay running?",
    503: "the relay, or a proxy in front of it, is busy or has no relay available; "
         "the agent retries",
    504: "a proxy in front of the relay timed out waiting for it",
}


#: Answers to an upgrade that mean the path, not the relay, said no: plain HTTP
#: requests (the HTTP transports) may still get through.
BLOCKING_STATUSES: Final = frozenset({*_PATH_BREAKS, 200, 404, 405, 501})


def brief(event: ws.HandshakeRejected) -> str:
    """What came back, in a few words, for the line that names the transport used
    instead: ``WebSocket upgrade stripped by squid/5.7 (got 200 OK without Upgrade)``."""
    server = get_header(event.headers, "server")
    who = f" by {one_line(server.encode('latin-1'), 60)}" if server else " on the way"
    if event.status == 0:
        return f"WebSocket upgrade cut{who} ({event.message})"
    got = f"got {event.status} {event.reason}".rstrip()
    if event.status == 101:
        return f"WebSocket upgrade broken{who} ({event.message})"
    return f"WebSocket upgrade stripped{who} ({got} without Upgrade)"


def explain_rejection(url: str, event: ws.HandshakeRejected) -> str:
    """What came back from the upgrade to ``url`` and what it means, in one line."""
    server = get_header(event.headers, "server")
    got = _what_came_back(event, server)
    said = f'; it said "{one_line(event.body, _BODY_EXCERPT)}"' if event.body else ""
    if event.status in _PATH_BREAKS:
        return f"{_NO_UPGRADE}: {got} at {url} \N{EM DASH} {_PATH_BREAKS[event.status]}{said}"
    hint = _OTHER.get(event.status, "the upgrade was refused")
    if event.status == 404 and _RELAY_404 in event.body:
        hint = _WRONG_PATH
    elif event.status == 503 and event.body.startswith(_RELAY_DRAINING):
        hint, said = _DRAINING, ""
    return f"{url}: {got} \N{EM DASH} {hint}{said}"


def _what_came_back(event: ws.HandshakeRejected, server: str | None) -> str:
    if event.status == 0:
        return event.message.replace("answered with", "got", 1)
    who = f" from {one_line(server.encode('latin-1'), 60)}" if server else ""
    if event.status == 101:
        return f"got {event.message.replace('answered ', '', 1)}{who}"
    return f"got {event.status} {event.reason}".rstrip() + who
