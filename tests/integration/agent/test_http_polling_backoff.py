"""HTTP polling rides out a short outage (agent/http_polling.py, ``_Retries``).

A polling request whose connection breaks is sent again, with the same number,
after growing waits for up to ``RETRY_BUDGET`` (docs/PROTOCOL.md §11.2). The
relay here does not offer resumption (``resume_grace: 0``), so the session must
survive a short cut on the retries alone; a cut past the budget ends it, and the
log says so. The path is a forwarder the test cuts (benchmarks/_cutter.py): every
connection through it reset at once, new ones reset while it is down.
"""

from __future__ import annotations

import trio

from benchmarks._cutter import PathCutter
from wstunnel.agent.http_polling import MAX_GETS_IN_FLIGHT, MAX_POSTS_IN_FLIGHT, RETRY_BUDGET

from ..log_watch import LogWatch
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    echo_exact,
    echo_handler,
    expect_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

MiB = 1 << 20
GIVEN_UP = "giving up on this session's requests"


async def _polling_through_cutter(nursery: trio.Nursery, target: int) -> tuple[PathCutter, int]:
    """A relay that does not resume, an agent on polling, the cutter between them."""
    relay = await start_relay(nursery, relay_config(resume_grace=0.0))
    cutter = PathCutter(relay.ports[0])
    await nursery.start(cutter.serve)
    agent = await start_agent(nursery, agent_config(cutter.port, [target], transport="polling"))
    return cutter, agent.ports[0]


async def test_a_short_cut_passes_without_ending_the_session(logs: LogWatch) -> None:
    """Two cuts of 0.3 s each, one during the upload, one during the download: the
    connection carries on, every byte arrives once, in order (sha256 equal), and the
    session stays the one it was (never down, never resumed)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(2 * MiB, b"down"))
            cutter, port = await _polling_through_cutter(nursery, digest)

            def stay_down() -> None:
                cutter.down_until = trio.current_time() + 0.3
            for mark in (1, 3):
                cutter.cut_after(mark * MiB, stay_down)
            await upload_and_download(port, 2 * MiB, 2 * MiB)
            assert cutter.cuts == 2
            assert any("went through again" in line for line in logs.lines)
            assert not any(" down: " in line or "resum" in line for line in logs.lines)
            assert sum("session up to" in line for line in logs.lines) == 1
            nursery.cancel_scope.cancel()


async def test_polling_requests_keep_their_connections(logs: LogWatch) -> None:
    """Twenty round trips, each a GET answered and a POST taken: the requests go on
    the connections they kept alive (opening one per request costs a handshake, and a
    TLS one more), and none breaks on the way."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            cutter, port = await _polling_through_cutter(nursery, echo)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                for index in range(20):
                    message = b"keystroke %d" % index
                    assert await echo_exact(stream, message) == message
            # (the opening POST's, one per GET and per POST in flight)
            assert cutter.connections <= 1 + MAX_GETS_IN_FLIGHT + MAX_POSTS_IN_FLIGHT
            assert not any("connection broke" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_a_cut_past_the_budget_ends_the_session_and_says_so(logs: LogWatch) -> None:
    """The path stays down: after RETRY_BUDGET of retries the agent gives up, logs how
    long the relay was unreachable and what happens next, and the open connection is
    reset (the session could not resume); once the path is back, the agent reconnects."""
    with trio.fail_after(RETRY_BUDGET + 10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            cutter, port = await _polling_through_cutter(nursery, echo)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"before") == b"before"
                cutter.down = True
                cutter.cut()
                cut_at = trio.current_time()
                line = await logs.wait_for(GIVEN_UP)
                assert trio.current_time() - cut_at >= RETRY_BUDGET
                assert f"could not be reached for {RETRY_BUDGET:.1f} s" in line
                assert "connections are reset" in line
                await expect_reset(stream)
            cutter.down = False  # (a new connection waits for the new session)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"after") == b"after"
            nursery.cancel_scope.cancel()


async def test_a_relay_that_lost_the_session_is_named_as_such(logs: LogWatch) -> None:
    """The relay at the address is another one after a cut (a restart): its 401 to the
    retried request is reported as a session the relay no longer knows, not as missing
    stickiness right after opening; the agent starts a new session, which carries."""
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            cutter, port = await _polling_through_cutter(nursery, echo)
            restarted = await start_relay(nursery, relay_config(resume_grace=0.0))
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"before") == b"before"
                cutter.target = restarted.ports[0]
                cutter.cut()
                line = await logs.wait_for("does not know this session")
                assert "any more" in line and "the agent starts a new session" in line
                assert "right after" not in line
                await expect_reset(stream)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"after") == b"after"
            nursery.cancel_scope.cancel()
