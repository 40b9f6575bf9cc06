"""Echo server on wstunnel.ws for Autobahn's fuzzingclient (a test tool, not product).

Accepts a WebSocket upgrade on any path with no subprotocol required and
echoes every text and binary message. The message limit is raised above the
16 MiB messages of Autobahn case 9. Prints ``listening on PORT`` once bound
(``--port 0`` picks a free port) and serves until killed.

    python tests/conformance/echo_server.py --port 0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Final

import trio

if __package__ in (None, ""):  # run as a script: make ``tests.conformance`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conformance.wsio import accept_server, echo  # noqa: E402

__all__ = ["ECHO_MAX_MESSAGE_SIZE", "handle_connection", "serve_echo", "main"]

#: Case 9 sends messages of up to 16 MiB; leave headroom.
ECHO_MAX_MESSAGE_SIZE: Final = 32 << 20

log = logging.getLogger("echo_server")


async def handle_connection(stream: trio.SocketStream) -> None:
    """Serve one connection; a broken socket ends only this connection."""
    try:
        peer = await accept_server(stream, subprotocol=None,
                                   max_message_size=ECHO_MAX_MESSAGE_SIZE)
        if peer is not None:
            await echo(peer)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("connection lost: %r", exc)
    except Exception:  # task root: one bad connection must not stop the server
        log.exception("connection handler failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_echo(host: str, port: int) -> None:
    """Bind, announce the port on stdout, and serve forever."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    print(f"listening on {bound}", flush=True)
    await trio.serve_listeners(handle_connection, listeners)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the server until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        trio.run(serve_echo, args.host, args.port)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
