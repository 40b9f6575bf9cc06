"""Which relay the agent's next session goes to, and when.

Theory of operation: ``Agent.maintain_session`` (agent.py) and ``--stdio``
(stdio.py) ask ``Reconnect`` for a relay before each connect and report how the
attempt went. Each relay
has a backoff of its own (exponential with jitter, from
``reconnect_min_interval`` to ``reconnect_max_interval``); the first relay, in
the configured order, whose backoff is over is tried, so the first listed is
preferred and a fallback is used only while it backs off. A refused token or a
429 waits at least ``REJECTED_RETRY_INTERVAL``: never hammer the relay. A
session that did not last counts as a failure. The config is read at each use,
because a reload replaces it (run.py). ``answers`` is the probe that tells a
session on a fallback relay that the preferred one is back
(``back_to_preferred``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection

import trio

from .. import ws
from ..config import AgentConfig, RelayURL
from ..errors import HandshakeError
from ..net.transport import TunnelTransport
from .connect import Dialer, open_stream

__all__ = ["REJECTED_RETRY_INTERVAL", "Reconnect", "answers"]

REJECTED_RETRY_INTERVAL = 30.0  # a refused token or a 429: never hammer the relay faster

log = logging.getLogger("wstunnel.agent")


class Reconnect:
    """Failures and the time each relay may be tried again, per relay."""

    def __init__(self, config: Callable[[], AgentConfig]) -> None:
        self._config = config
        self._failures: dict[RelayURL, int] = {}
        self._ready_at: dict[RelayURL, float] = {}

    async def choose(self) -> RelayURL:
        """The first relay, in the configured order, whose backoff is over (waiting for
        the earliest when none is)."""
        while True:
            relay, ready_at = self.next_relay()
            if ready_at <= trio.current_time():
                return relay
            await trio.sleep_until(ready_at)  # (then again: a reload may change the list)

    def next_relay(self, skip: Collection[RelayURL] = ()) -> tuple[RelayURL, float]:
        """(the relay ``choose`` returns, when it may be tried): the first, in the
        configured order, whose backoff is over, else the one ready soonest. ``skip``:
        relays not to try at all (``--stdio`` leaves out those that refused it); at
        least one must be left.
        """
        now = trio.current_time()
        relays = [relay for relay in self._config().relay_urls if relay not in skip]
        ready = [(max(now, self._ready_at.get(relay, now)), index, relay)
                 for index, relay in enumerate(relays)]
        ready_at, _, relay = min(ready)  # (the earliest; among those ready, the first)
        return relay, ready_at

    def connect_failed(self, relay: RelayURL, refused: bool) -> tuple[int, float]:
        """A connect to ``relay`` failed (``refused``: on purpose); returns (failures
        in a row, seconds until ``relay`` is tried again)."""
        count = self._failures[relay] = self._failures.get(relay, 0) + 1
        delay = self.backoff(count)
        if refused:
            delay = max(delay, REJECTED_RETRY_INTERVAL)
        self._ready_at[relay] = trio.current_time() + delay
        return count, delay

    def connected(self, relay: RelayURL) -> None:
        """A session is up on ``relay``: it may be tried at once after it ends."""
        self._ready_at.pop(relay, None)

    def session_ended(self, relay: RelayURL, lasted: float, *, goaway: bool = False) -> float:
        """A session on ``relay`` ended after ``lasted`` seconds (``goaway``: its relay
        is going away, and the session drains); returns the seconds until ``relay``
        is tried again."""
        config = self._config()
        if goaway and lasted >= config.reconnect_min_interval:
            # A relay behind a balancer is stopping (a rolling restart): the next
            # session goes elsewhere at once, and this is no failure. (Restarts a few
            # seconds apart used to grow the wait past connect_wait_timeout.)
            self._ready_at.pop(relay, None)
            return 0.0
        # A session that did not last (a relay or a middlebox that ends each one at
        # once) counts as a failure: the backoff keeps growing, not one retry a second.
        if lasted >= config.reconnect_max_interval:
            self._failures.pop(relay, None)
        count = self._failures[relay] = self._failures.get(relay, 0) + 1
        delay = self.backoff(count)
        self._ready_at[relay] = trio.current_time() + delay
        return delay

    def next_step(self, delay: float) -> str:
        """What happens next, for the log line of a failed connect."""
        now = trio.current_time()
        for relay in self._config().relay_urls:
            if self._ready_at.get(relay, 0.0) <= now:
                return f"trying {relay.url}"
        return f"retrying in {delay:.1f} s"

    def backoff(self, failures: int) -> float:
        """Exponential in ``failures``, capped, with jitter so agents do not retry in step."""
        config = self._config()
        delay = min(
            config.reconnect_max_interval, config.reconnect_min_interval * 2 ** (failures - 1)
        )
        return float(delay) * random.uniform(0.8, 1.0)

    async def back_to_preferred(self, transport: TunnelTransport, idle: Callable[[], bool],
                                dial: Callable[[], Dialer | None]) -> None:
        """While a session is up on a fallback relay: once the preferred one answers
        again and no connection is open here (``idle``), end this session (GOAWAY,
        close) so the next one goes to the preferred relay. Checked every
        reconnect_max_interval."""
        preferred = self._config().relay_urls[0]
        while True:
            await trio.sleep(self._config().reconnect_max_interval)
            if idle() and await answers(preferred, self._config(), dial()):
                log.info("the preferred relay %s answers again; moving this idle session "
                         "back to it", preferred.url)
                transport.go_away("moving to the preferred relay")
                await transport.close(ws.CloseCode.GOING_AWAY, "moving to the preferred relay")
                return


async def answers(relay: RelayURL, config: AgentConfig, dial: Dialer | None) -> bool:
    """The relay answers GET /health with 200 (through the proxy and TLS the agent
    would use)."""
    from ..security import tls

    context = tls.client_context(config.client_tls) if relay.secure else None
    try:
        with trio.fail_after(config.handshake_timeout):
            stream = await open_stream(relay, ssl_context=context, dial=dial,
                                       server_hostname=config.server_name,
                                       pin=config.relay_fingerprint)
            async with stream:
                host = config.host_header or relay.host_header
                await stream.send_all(f"GET /health HTTP/1.1\r\nHost: {host}\r\n"
                                      "Connection: close\r\n\r\n".encode())
                head = await stream.receive_some(1024)
    except (OSError, HandshakeError, trio.TooSlowError, trio.BrokenResourceError):
        return False
    return head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
