"""Garbage at the relay's door: random and mutated byte streams only ever end cleanly.

What runs is exactly the relay's per-connection path minus the sockets and
the clock: the relay's HTTP upgrade parser, its door (``relay/door.py``:
routing and login), then the relay-side ``TunnelProtocol`` (WebSocket +
multiplexer) the door starts with the relay's limits, and the relay
accepting or refusing each OPEN. "Clean" means: no exception escapes, an
HTTP answer is a well-formed response with the status the door reports,
and every stream ends with the protocol terminal, any failure having queued
a close frame with a proper code (and, for a multiplexer violation, the
GOAWAY with its error code before it).

Each input is also checked for how far it got (``Stage``): an input whose
first bytes are those of the valid conversation must get at least as far as
those bytes take it, so a setup that answers everything with an HTTP error
(a wrong path, say) fails instead of passing on inputs that never reach the
multiplexer. The door itself is also fed requests with any target and any
login headers, against a relay with agents, trusted proxies and mutual TLS.
"""

from __future__ import annotations

import enum
import itertools
import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from wstunnel import mux, ws
from wstunnel.addresses import HostPort
from wstunnel.config import AgentAccount, RelayConfig
from wstunnel.mux.wire import GoAway, decode_record
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay.door import Accepted, Answer, Door, NeedsLogin, Visitor, server_handshake
from wstunnel.security.auth import hash_token, new_token, scrypt_hash
from wstunnel.security.forwarded import parse_trusted_proxy

CONFIG = RelayConfig(listen=HostPort("127.0.0.1", 0), no_auth=True, max_channels=8,
                     max_message_size=64 * 1024)
DOOR = Door(CONFIG)
VISITOR = Visitor("192.0.2.1:40000", "192.0.2.1")
CLEAN_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011}


def _fixed(n: int) -> bytes:
    return b"\x01" * n


class Stage(enum.IntEnum):
    """How far one input got through the relay."""

    HTTP = 0  # answered over HTTP, or the request never completed
    HANDSHAKE_ACCEPTED = 1  # 101 sent: the WebSocket session started
    SESSION_RUNNING = 2  # the agent's SETTINGS reached the multiplexer
    CHANNEL_OPENED = 3  # an OPEN reached the relay's channel handling


@dataclass
class Served:
    stage: Stage
    failed: bool
    closes: list[int]  # close codes the relay sent


def _valid_stream() -> tuple[bytes, dict[Stage, int]]:
    """A well-formed agent conversation, and for each stage how many of its
    bytes it takes, intact, to reach it."""
    request = ws.ClientHandshake("relay", "/tunnel", random_bytes=_fixed).data_to_send()
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=_fixed)
    settings = agent.data_to_send()
    first = agent.open_channel("127.0.0.1", 22, early_data=b"hello")
    opening = agent.data_to_send()
    agent.open_channel("db.internal", 5432)
    agent.ping(b"p")
    body = settings + opening + agent.data_to_send()
    agent.send_data(first, b"x" * 3000)
    agent.send_eof(first)
    agent.reset_channel(first + 2)
    agent.go_away(0, "bye")
    body += agent.data_to_send()
    agent.close(1000, "done")
    body += agent.data_to_send()
    needs = {Stage.HTTP: 0, Stage.HANDSHAKE_ACCEPTED: len(request),
             Stage.SESSION_RUNNING: len(request) + len(settings),
             Stage.CHANNEL_OPENED: len(request) + len(settings) + len(opening)}
    return request + body, needs


VALID, NEEDS = _valid_stream()
BODY_START = NEEDS[Stage.HANDSHAKE_ACCEPTED]


def _expected_stage(data: bytes) -> Stage:
    """The stage ``data`` must reach: the furthest its intact prefix of VALID takes it."""
    intact = next((i for i, (a, b) in enumerate(zip(data, VALID, strict=False)) if a != b),
                  min(len(data), len(VALID)))
    return max(stage for stage, size in NEEDS.items() if intact >= size)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    start = BODY_START if rng.random() < 0.6 else 0  # mostly keep the request intact
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(6)
        at = rng.randint(start, max(start, len(buf) - 1))
        if kind == 0 and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 2:
            del buf[at:at + rng.randint(1, 64)]
        elif kind == 3:
            buf[at:at] = buf[at:at + rng.randint(1, 200)]
        elif kind == 4:
            del buf[at:]
        elif at < len(buf):
            buf[at] = rng.choice((0, 0x7F, 0x80, 0xFF))
    return bytes(buf)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        step = rng.choice((1, 7, 64, 1500, len(data)))
        out.append(data[i:i + step])
        i += step
    return out


def _serve(chunks: list[bytes], rng: random.Random) -> Served:
    """The relay's path for one connection, minus sockets; asserts a clean ending."""
    handshake = server_handshake()
    pending = list(chunks)
    event = handshake.next_event()
    while event is None and pending:
        handshake.receive_data(pending.pop(0))
        event = handshake.next_event()
    if event is None:  # the stream ended inside the request (as upgrade.read_request)
        handshake.receive_eof()
        event = handshake.next_event()
        if event is None:
            return Served(Stage.HTTP, False, [])  # nobody to answer
    outcome = DOOR.enter(handshake, event, VISITOR, now=0.0)
    if isinstance(outcome, Answer):
        _check_answer(outcome)
        return Served(Stage.HTTP, False, [])  # the relay answers over HTTP and closes
    assert isinstance(outcome, Accepted), outcome  # (no_auth: never a login to check)
    response, protocol = DOOR.start_session(handshake)
    assert response.startswith(b"HTTP/1.1 101 ")
    sent = bytearray()
    reached = [Stage.HANDSHAKE_ACCEPTED]
    for chunk in [b"", *pending]:
        if chunk:
            protocol.receive_data(chunk)
        sent += _react(protocol, rng, reached)
    protocol.receive_eof()
    sent += _react(protocol, rng, reached)
    assert protocol.closed
    failed = protocol.failure is not None
    return Served(max(reached), failed, _check_output(bytes(sent), failed=failed))


def _check_answer(answer: Answer) -> None:
    """An HTTP answer is one complete response, with the status the door reports, that
    closes the connection."""
    head, _, body = answer.response.partition(b"\r\n\r\n")
    status_line, *headers = head.split(b"\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in headers)
    assert status_line.startswith(b"HTTP/1.1 %d " % answer.status), answer
    assert b"close" in fields[b"connection"] and fields[b"content-length"] == b"%d" % len(body)


def _check_output(sent: bytes, *, failed: bool) -> list[int]:
    """What the relay sent is valid WebSocket; after a failure it ends in a proper close,
    after a multiplexer violation with the GOAWAY (carrying an error code) right before
    it. Returns the close codes sent."""
    agent = ws.WebSocketConnection(ws.Role.CLIENT, max_message_size=1 << 24)
    agent.receive_data(sent)
    events = agent.events_received()
    closes = [e for e in events if isinstance(e, ws.CloseReceived)]
    assert agent.failure is None
    if failed:
        assert closes and closes[0].code in CLEAN_CODES
    if closes and closes[0].reason == "multiplexer protocol error":
        messages = [e for e in events if isinstance(e, ws.BytesMessage)]
        last = decode_record(bytes(messages[-1].data))
        assert isinstance(last, GoAway) and last.code != 0
    return [close.code for close in closes]


def _react(protocol: TunnelProtocol, rng: random.Random, reached: list[Stage]) -> bytes:
    """Answer the relay's events as the relay does: the first OPEN is accepted, the
    others at random; notes the stages reached in ``reached``."""
    for event in protocol.events_received():
        if isinstance(event, mux.SettingsReceived):
            reached.append(Stage.SESSION_RUNNING)
        elif isinstance(event, mux.ChannelOpenRequested):
            first = Stage.CHANNEL_OPENED not in reached
            reached.append(Stage.CHANNEL_OPENED)
            if first or rng.random() < 0.5:
                protocol.accept_channel(event.channel_id)
            else:
                protocol.refuse_channel(event.channel_id, mux.OpenFailure.FORBIDDEN, "no")
        elif isinstance(event, mux.DataReceived):
            protocol.acknowledge(event.channel_id, len(event.data))
    return bytes(protocol.data_to_send())


def test_the_valid_stream_is_served() -> None:
    """The unmutated conversation, whole and byte by byte, reaches the channel stage and
    ends with a normal close, echoed."""
    rng = random.Random(0)
    for chunks in ([VALID], [VALID[i:i + 1] for i in range(len(VALID))]):
        served = _serve(chunks, rng)
        assert served == Served(Stage.CHANNEL_OPENED, False, [1000])


def test_ten_thousand_mutated_streams_end_cleanly() -> None:
    """10,000 seeded mutations (bit flips, inserts, cuts, repeats, truncations, random
    split points) of a real agent conversation, and pure noise, only ever end cleanly;
    each gets at least as far as its intact prefix takes it, and every stage is
    reached by many of them."""
    reached = dict.fromkeys(Stage, 0)
    for seed in range(10_000):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randint(0, 400)) if seed % 10 == 0 else _mutate(rng, VALID)
        if seed % 10 == 1:
            data = VALID[:BODY_START] + rng.randbytes(rng.randint(0, 600))
        stage = _serve(_chunks(rng, data), rng).stage
        assert stage >= _expected_stage(data), f"seed {seed}"
        reached[stage] += 1
    assert min(reached.values()) >= 100, reached


@given(st.integers(0, len(VALID) - BODY_START), st.binary(max_size=2000),
       st.randoms(use_true_random=False))
def test_any_body_after_a_good_request_ends_cleanly(
    kept: int, body: bytes, rng: random.Random
) -> None:
    """Arbitrary bytes after a valid upgrade request and any intact part of the valid
    conversation: a clean close, never an exception, and at least the stage that the
    intact part reaches."""
    data = VALID[:BODY_START + kept] + body
    assert _serve(_chunks(rng, data), rng).stage >= _expected_stage(data)


# -- the door alone, with logins ------------------------------------------------------

TOKEN = new_token("a1")
OLD_TOKEN = new_token("old")  # an agent whose token_hash is the older scrypt form
WRONG_TOKEN = TOKEN[:-1] + ("B" if TOKEN.endswith("A") else "A")
LOGIN_CONFIG = RelayConfig(
    listen=HostPort("127.0.0.1", 0),
    agents=(AgentAccount("a1", hash_token(TOKEN)),
            AgentAccount("old", scrypt_hash(OLD_TOKEN, n=16)),
            AgentAccount("cert")),  # "cert": logs in with its client certificate alone
    trusted_proxies=(parse_trusted_proxy("192.0.2.0/24"),))
# Each Authorization header, and the agent its token proves ("" for none, None: no token).
AUTHORIZATIONS: dict[str | None, str | None] = {
    None: None, f"Bearer {TOKEN}": "a1", f"bearer  {TOKEN} ": "a1",
    f"Bearer {OLD_TOKEN}": "old", f"Bearer {WRONG_TOKEN}": "", "Bearer nobody.c2VjcmV0": "",
    "Basic YTE6eA==": None, "Bearer": None}
TARGETS = ["/tunnel", "/tunnel?v=1", "/health", "/elsewhere", "*"]
CERTS = [None, "a1", "old", "cert", "stranger"]
FORWARDED = [None, "198.51.100.7, 192.0.2.9", "[::1]:80, garbage"]


def _login_request(target: str, authorization: str | None, forwarded: str | None,
                   subprotocol: bool) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: relay", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    lines += [f"Sec-WebSocket-Protocol: {ws.SUBPROTOCOL}"] if subprotocol else []
    lines += [f"Authorization: {authorization}"] if authorization is not None else []
    lines += [f"X-Forwarded-For: {forwarded}"] if forwarded is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _knock(door: Door, data: bytes, cert_name: str | None, peer_host: str,
           scrypt_says: bool | None) -> Answer | Accepted:
    """One request through the door, a scrypt check answered with ``scrypt_says``; the
    answer is checked for form, and the session started when it is accepted (and
    ended: its seat released)."""
    handshake = server_handshake()
    handshake.receive_data(data)
    event = handshake.next_event()
    assert event is not None
    outcome = door.enter(handshake, event, Visitor(f"{peer_host}:40000", peer_host, cert_name),
                         now=0.0)
    if isinstance(outcome, NeedsLogin):
        assert outcome.account.name == "old" and outcome.token == OLD_TOKEN
        outcome = door.finish_login(handshake, outcome, scrypt_says, now=0.0)
    if isinstance(outcome, Answer):
        _check_answer(outcome)
        assert outcome.failed_login == (outcome.status == 401)
    else:
        assert door.start_session(handshake)[0].startswith(b"HTTP/1.1 101 ")
        outcome.seat.release()
    return outcome


def _expected(target: str, subprotocol: bool, proves: str | None, cert_name: str | None,
              scrypt_says: bool | None) -> int | str:
    """The door's rules, written out: the agent let in, or the HTTP status."""
    if target.split("?")[0] != "/tunnel":
        return 404
    if not subprotocol:
        return 400
    if cert_name == "cert" and proves is None:
        return "cert"  # (its entry has no token_hash: the certificate is enough)
    if not proves or cert_name not in (None, proves):
        return 401
    if proves == "old" and scrypt_says is not True:
        return 503 if scrypt_says is None else 401
    return proves


def test_every_combination_of_path_credentials_and_proxy_gets_exactly_its_stage() -> None:
    """All 7,200 combinations of path, subprotocol, Authorization, client certificate,
    X-Forwarded-For, peer (trusted proxy or not) and scrypt outcome: the door lets in
    exactly the agent whose credential was presented, and answers everything else with
    the status its rules give, as a well-formed HTTP answer."""
    door = Door(LOGIN_CONFIG)
    remembered = False  # (a scrypt token that passed once is let in from then on)
    reached: Counter[int | str] = Counter()
    for target, subprotocol, (auth, proves), cert, forwarded, peer, says in itertools.product(
            TARGETS, (True, False), AUTHORIZATIONS.items(), CERTS, FORWARDED,
            ("192.0.2.1", "203.0.113.5"), (None, False, True)):
        data = _login_request(target, auth, forwarded, subprotocol)
        outcome = _knock(door, data, cert, peer, says)
        got = outcome.identity.name if isinstance(outcome, Accepted) else outcome.status
        expected = _expected(target, subprotocol, proves, cert, True if remembered else says)
        assert got == expected, (target, subprotocol, auth, cert, forwarded, peer, says)
        remembered = remembered or got == "old"
        reached[got] += 1
    assert set(reached) == {400, 401, 404, 503, "a1", "old", "cert"}, reached


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)


@given(st.sampled_from(TARGETS), st.one_of(st.sampled_from(list(AUTHORIZATIONS)), _HEADER_TEXT),
       st.one_of(st.sampled_from(FORWARDED), _HEADER_TEXT), st.sampled_from(CERTS),
       st.sampled_from([True, False, None]))
def test_any_login_headers_get_an_answer_or_exactly_their_agent(
    target: str, authorization: str | None, forwarded: str | None, cert_name: str | None,
    scrypt_says: bool | None,
) -> None:
    """Any text in Authorization and X-Forwarded-For: never an exception, a well-formed
    HTTP answer, or the agent whose credential was presented."""
    outcome = _knock(Door(LOGIN_CONFIG), _login_request(target, authorization, forwarded, True),
                     cert_name, "192.0.2.1", scrypt_says)
    if isinstance(outcome, Accepted):
        credential = {"a1": TOKEN, "old": OLD_TOKEN}.get(outcome.identity.name, "")
        assert cert_name in (None, outcome.identity.name)
        assert credential in (authorization or "") or cert_name == "cert"
