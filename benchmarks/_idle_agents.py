"""Many idle agent sessions in one process: the load for ``many_agents.py``.

Why not N ``wstunnel agent`` processes: a thousand interpreters would cost
this 2-core machine about 20 GiB and their start-up would dominate the run.
What the relay sees is the same: one TCP connection per session, the
WebSocket upgrade an agent sends (``ws.ClientHandshake``), the agent's end of
the tunnel protocol (``TunnelProtocol``: SETTINGS first, pongs to the relay's
pings) and the agent's keepalive (net/transport.py): a ping to the relay once
nothing has arrived for ``--ping-interval``, phases spread over the interval
as independent agents' are (``--keepalive always``: every interval whatever
arrived, as before issue 22). No channels: the sessions are idle.

One trio task per session; each waits for bytes from the relay or its next
ping, whichever comes first, so a session costs this process nothing between
the two.

    python benchmarks/_idle_agents.py --port PORT [--ping-interval S] [--tls]
        reads commands on stdin, one per line, and answers each with a JSON line:
        ``grow N``  open sessions until N are up (``--batch`` upgrades at a time);
                    answers {"up": n, "failed": f, "pongs": p, "reads": r, "ended": e,
                    "seconds": s}
        ``stats``   the same counters now
        EOF         close every session and exit
"""

from __future__ import annotations

import argparse
import json
import random
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Final

import trio

from wstunnel import mux, ws
from wstunnel.protocol import TunnelProtocol

LOOPBACK: Final = "127.0.0.1"
READ_SIZE: Final = 65536
#: The longest one ``grow`` may take before it answers with what is up.
GROW_TIMEOUT: Final = 120.0
CONNECT_TIMEOUT: Final = 30.0


@dataclass
class Counters:
    up: int = 0
    failed: int = 0
    pongs: int = 0
    reads: int = 0  # reads with bytes from the relay: its pongs and its pings
    ended: int = 0
    seconds: float = 0.0


class Holder:
    """The sessions, their counters, and the event that a grow waits on."""

    def __init__(self, port: int, ping_interval: float, batch: int, *,
                 always: bool = False, tls: bool = False) -> None:
        self.port = port
        # wss:// to the relay's self-signed certificate: this is load, not a client
        # anyone trusts, so nothing is verified.
        self.tls: ssl.SSLContext | None = None
        if tls:
            self.tls = ssl.create_default_context()
            self.tls.check_hostname = False
            self.tls.verify_mode = ssl.CERT_NONE
        self.ping_interval = ping_interval
        self.always = always
        self.opening = trio.CapacityLimiter(batch)
        self.counters = Counters()
        self.changed = trio.Event()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def grow(self, nursery: trio.Nursery, total: int) -> None:
        start = time.perf_counter()
        counters = self.counters
        for _ in range(total - counters.up - counters.failed):
            nursery.start_soon(self.session)
        with trio.move_on_after(GROW_TIMEOUT):
            while counters.up + counters.failed < total:
                await self.changed.wait()
        counters.seconds = time.perf_counter() - start

    async def session(self) -> None:
        """One agent session: upgrade, then answer the relay and ping it, forever."""
        try:
            async with self.opening:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream, protocol = await self._upgrade()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, RuntimeError) as exc:
            print(f"session failed to start: {exc!r}", file=sys.stderr)
            self.counters.failed += 1
            self._changed()
            return
        self.counters.up += 1
        self._changed()
        try:
            async with stream:
                await self._serve(stream, protocol)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.counters.ended += 1

    async def _upgrade(self) -> tuple[trio.abc.Stream, TunnelProtocol]:
        stream: trio.abc.Stream = await trio.open_tcp_stream(LOOPBACK, self.port)
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_hostname="relay.invalid")
            await stream.do_handshake()
        handshake = ws.ClientHandshake(f"{LOOPBACK}:{self.port}", "/tunnel")
        await stream.send_all(handshake.data_to_send())
        while (event := handshake.next_event()) is None:
            data = await stream.receive_some(READ_SIZE)
            if data:
                handshake.receive_data(data)
            else:
                handshake.receive_eof()
        if not isinstance(event, ws.HandshakeAccepted):
            await stream.aclose()
            raise RuntimeError(f"upgrade refused: {event.message}")
        protocol = TunnelProtocol(mux.Role.AGENT, trailing_data=event.trailing_data)
        await stream.send_all(protocol.data_to_send())  # our SETTINGS
        return stream, protocol

    async def _serve(self, stream: trio.abc.Stream, protocol: TunnelProtocol) -> None:
        interval = self.ping_interval
        next_ping = trio.current_time() + random.uniform(0, interval)  # noqa: S311
        last_received = -interval
        while not protocol.closed:
            with trio.move_on_at(next_ping) as waited:
                data = await stream.receive_some(READ_SIZE)
            now = trio.current_time()
            if waited.cancelled_caught:
                next_ping = now + interval
                if self.always or now - last_received >= interval:
                    protocol.ping(b"wstunnel")
            elif not data:
                return
            else:
                last_received = now
                self.counters.reads += 1
                protocol.receive_data(data)
                self.counters.pongs += sum(
                    type(event) is ws.PongReceived for event in protocol.events_received())
            out = protocol.data_to_send()
            if out:
                await stream.send_all(out)


async def _commands(holder: Holder) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            words = line.split()
            if not words:
                break
            if words[0] == "grow":
                await holder.grow(nursery, int(words[1]))
            print(json.dumps(asdict(holder.counters)), flush=True)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the relay's port on 127.0.0.1")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=50, help="upgrades in flight at once")
    parser.add_argument("--keepalive", choices=("idle", "always"), default="idle",
                        help="ping when nothing arrived for an interval, or every interval")
    parser.add_argument("--tls", action="store_true", help="wss:// (nothing verified)")
    args = parser.parse_args(argv)
    trio.run(_commands, Holder(args.port, args.ping_interval, args.batch,
                               always=args.keepalive == "always", tls=args.tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
