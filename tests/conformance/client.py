"""Client on wstunnel.ws that drives Autobahn's fuzzingserver (a test tool).

Asks the server how many cases it has (``/getCaseCount``), runs each one
(``/runCase?case=N&agent=AGENT``: echo everything until the server closes),
then asks it to write its reports (``/updateReports?agent=AGENT``).

    python tests/conformance/client.py --url ws://127.0.0.1:9001 --agent wstunnel
"""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.parse
from pathlib import Path
from typing import Final

import trio

if __package__ in (None, ""):  # run as a script: make ``tests.conformance`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conformance.wsio import Peer, echo, open_client  # noqa: E402
from wstunnel.ws import TextMessage

__all__ = ["CLIENT_MAX_MESSAGE_SIZE", "run_all", "main"]

#: Case 9 sends messages of up to 16 MiB; leave headroom.
CLIENT_MAX_MESSAGE_SIZE: Final = 32 << 20

log = logging.getLogger("autobahn_client")


async def _connect(url: str, path: str) -> Peer:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    stream = await trio.open_tcp_stream(host, port)
    try:
        return await open_client(stream, f"{host}:{port}", path, subprotocol=None,
                                 max_message_size=CLIENT_MAX_MESSAGE_SIZE)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _collect_text(peer: Peer) -> list[str]:
    """Read until the server closes, keeping its text messages."""
    texts: list[str] = []
    try:
        while (event := await peer.next_event()) is not None:
            if isinstance(event, TextMessage):
                texts.append(event.data)
    finally:
        await trio.aclose_forcefully(peer.stream)
    return texts


async def get_case_count(url: str) -> int:
    """Ask the fuzzingserver how many cases it will run."""
    texts = await _collect_text(await _connect(url, "/getCaseCount"))
    return int(texts[0])


async def run_case(url: str, agent: str, number: int) -> None:
    """Run one case: echo what the server sends until it closes."""
    quoted = urllib.parse.quote(agent)
    peer = await _connect(url, f"/runCase?case={number}&agent={quoted}")
    try:
        await echo(peer)
    finally:
        await trio.aclose_forcefully(peer.stream)


async def update_reports(url: str, agent: str) -> None:
    """Tell the server to write index.json and the per-case reports."""
    quoted = urllib.parse.quote(agent)
    await _collect_text(await _connect(url, f"/updateReports?agent={quoted}"))


async def run_all(url: str, agent: str, case_timeout: float) -> int:
    """Run every case; return how many could not even be run to the end."""
    with trio.fail_after(30):
        count = await get_case_count(url)
    print(f"fuzzingserver has {count} cases", flush=True)
    broken = 0
    for number in range(1, count + 1):
        with trio.move_on_after(case_timeout) as scope:
            try:
                await run_case(url, agent, number)
            except Exception:  # task root: a broken case is reported, the run goes on
                log.exception("case #%d failed to run", number)
                broken += 1
        if scope.cancelled_caught:
            print(f"case #{number} timed out after {case_timeout} s", flush=True)
            broken += 1
    with trio.fail_after(60):
        await update_reports(url, agent)
    return broken


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run all cases; exit 1 if a case could not run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:9001")
    parser.add_argument("--agent", default="wstunnel")
    parser.add_argument("--case-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    broken = trio.run(run_all, args.url, args.agent, args.case_timeout)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
