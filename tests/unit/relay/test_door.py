"""The relay's door (relay/door.py): every routing answer and every login outcome, from bytes.

Requests are written out as bytes, parsed by the relay's own parser and handed
to the door; the tests look at what the door returns (the status, the exact
response bytes, the log lines) and at nothing inside it.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import pytest

from wstunnel import mux, ws
from wstunnel.addresses import HostPort
from wstunnel.config import AgentAccount, RelayConfig
from wstunnel.protocol import SessionLimits, TunnelProtocol
from wstunnel.relay import door as door_module
from wstunnel.relay.door import (
    Accepted,
    Answer,
    Door,
    LogLine,
    NeedsLogin,
    Outcome,
    Seat,
    Visitor,
    server_handshake,
)
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.auth import hash_token, new_token, scrypt_hash
from wstunnel.security.forwarded import parse_trusted_proxy

PEER = "192.0.2.1:40000"
VISITOR = Visitor(PEER, "192.0.2.1")
TOKEN = new_token("a1")
WRONG_TOKEN = TOKEN[:-1] + ("B" if TOKEN.endswith("A") else "A")
OLD_TOKEN = new_token("old")  # its token_hash is the older scrypt form
ALLOW = (AllowRule.parse("127.0.0.1:22"),)
AGENTS = (AgentAccount("a1", hash_token(TOKEN), ALLOW),
          AgentAccount("old", scrypt_hash(OLD_TOKEN, n=16)),
          AgentAccount("c1"))  # c1: mutual TLS only, no token_hash
OPEN = RelayConfig(listen=HostPort("127.0.0.1", 0), no_auth=True)
LOGINS = RelayConfig(listen=HostPort("127.0.0.1", 0), agents=AGENTS, max_sessions_per_agent=2)
UNAUTHORIZED = (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: 22\r\nConnection: close\r\n"
                b'WWW-Authenticate: Bearer realm="wstunnel"\r\n\r\nauthentication failed\n')


def _request(target: str = "/tunnel", *, method: str = "GET", upgrade: bool = True,
             subprotocol: bool = True, headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: relay.example"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade",
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {ws.SUBPROTOCOL}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode("latin-1")


def _login(token: str) -> tuple[str, ...]:
    return (f"Authorization: Bearer {token}",)


def _knock(door: Door, data: bytes, visitor: Visitor = VISITOR, *, now: float = 0.0,
           stopping: bool = False, seat: Seat | None = None
           ) -> tuple[Outcome, ws.ServerHandshake]:
    handshake = server_handshake()
    handshake.receive_data(data)
    request = handshake.next_event()
    assert request is not None
    return door.enter(handshake, request, visitor, now=now, stopping=stopping,
                      seat=seat), handshake


def _answer(door: Door, data: bytes, visitor: Visitor = VISITOR, *, now: float = 0.0,
            stopping: bool = False) -> Answer:
    outcome, _ = _knock(door, data, visitor, now=now, stopping=stopping)
    assert isinstance(outcome, Answer), outcome
    return outcome


def _accepted(outcome: Outcome) -> tuple[str, str, str, tuple[LogLine, ...]]:
    """Who got in (and under which policy, as text), the name for logs, the log lines."""
    assert isinstance(outcome, Accepted), outcome
    return outcome.identity.name, repr(outcome.identity.policy), outcome.peer, outcome.log


def _text_answer(status: str, text: str, *headers: str) -> bytes:
    """The bytes of a one-line text answer that closes the connection."""
    body = text.encode() + b"\n"
    lines = [f"HTTP/1.1 {status}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _warning(text: str) -> tuple[LogLine, ...]:
    return (LogLine(logging.WARNING, text),)


# -- routing ----------------------------------------------------------------------------


def test_a_request_the_parser_refused_gets_its_answer_and_an_info_line() -> None:
    """A request that is not HTTP gets the parser's bare 400, the detail only in the log."""
    answer = _answer(Door(OPEN), b"HELLO\r\n\r\n")
    assert answer.status == 400 and not answer.failed_login
    assert answer.response == _text_answer("400 Bad Request", "bad request")
    assert answer.log[0].level == logging.INFO
    assert answer.log[0].text.startswith(f"{PEER}: bad HTTP request (bad HTTP request: ")


def test_the_relay_parses_at_most_100_header_lines() -> None:
    """Past 100 header lines the answer is 431 (the relay's parser limit), at 100 the
    request goes on."""
    base = len(_request().split(b"\r\n")) - 3  # (request line, two blank lines)
    many = tuple(f"X-Filler-{i}: x" for i in range(101 - base))
    answer = _answer(Door(OPEN), _request(headers=many))
    assert answer.status == 431 and answer.response.startswith(b"HTTP/1.1 431 ")
    outcome, _ = _knock(Door(OPEN), _request(headers=many[1:]))
    assert isinstance(outcome, Accepted)


@pytest.mark.parametrize("target", ["/health", "/health?probe=1"])
def test_health_is_200_ok_for_a_plain_request(target: str) -> None:
    """GET /health (any query) answers 200 "ok", and logs nothing."""
    answer = _answer(Door(OPEN), _request(target, upgrade=False))
    assert answer == Answer(200, _text_answer("200 OK", "ok"))


def test_health_is_404_draining_while_the_relay_drains() -> None:
    """While the relay drains, GET /health answers 404 saying so: what haproxy's
    `http-check disable-on-404` takes as "no new sessions, still the sticky ones"."""
    answer = _answer(Door(OPEN), _request("/health", upgrade=False), stopping=True)
    assert answer == Answer(404, _text_answer("404 Not Found", door_module.DRAINING_HEALTH))
    assert answer.response.endswith(b"\r\n\r\ndraining: shutting down; only resumes of the "
                                    b"sessions this relay holds are taken\n")


@pytest.mark.parametrize(("target", "status"), [("/health", "200 OK"),
                                                ("/elsewhere", "404 Not Found")])
def test_a_head_request_gets_the_head_of_the_answer_only(target: str, status: str) -> None:
    """HEAD (some load balancers' health check) gets the status and headers a GET gets,
    Content-Length included, and no body (RFC 9110 9.3.2)."""
    answer = _answer(Door(OPEN), _request(target, method="HEAD", upgrade=False))
    head = _text_answer(status, "nothing here; the tunnel is at /tunnel" if "404" in status
                        else "ok").partition(b"\r\n\r\n")[0]
    assert answer.response == head + b"\r\n\r\n"


@pytest.mark.parametrize("target", ["/", "/tunnel/x", "/health", "*"])
def test_another_path_is_404_naming_the_tunnel_path(target: str) -> None:
    """Any other path (and an upgrade to /health) is 404 naming the tunnel's path."""
    answer = _answer(Door(OPEN), _request(target))
    assert answer == Answer(404, _text_answer("404 Not Found",
                                              "nothing here; the tunnel is at /tunnel"))


def test_a_reloaded_path_applies_to_the_next_request() -> None:
    """After reconfigure, the tunnel is at the new path and the old one is 404."""
    door = Door(OPEN)
    door.reconfigure(RelayConfig(listen=OPEN.listen, path="/t2", no_auth=True))
    assert _answer(door, _request("/tunnel")).status == 404
    assert isinstance(_knock(door, _request("/t2?x=1"))[0], Accepted)


def test_a_draining_relay_answers_503_on_the_tunnel_path() -> None:
    """While the relay drains, a good upgrade gets 503 and no login is attempted."""
    answer = _answer(Door(LOGINS), _request(headers=_login(TOKEN)), stopping=True)
    assert answer == Answer(503, _text_answer("503 Service Unavailable", (
        "the relay is shutting down and takes no new session (it lets its sessions finish): "
        "connect to another relay, or try again once this one is back")))


def test_a_plain_request_on_the_tunnel_path_is_426_with_the_upgrade_headers() -> None:
    """GET /tunnel without Upgrade gets 426 Upgrade Required (RFC 6455 4.2.2) and a line."""
    answer = _answer(Door(OPEN), _request(upgrade=False, subprotocol=False))
    assert answer.status == 426
    assert answer.response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n" in answer.response
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer.response
    assert answer.log == (LogLine(logging.INFO,
                                  f"{PEER}: plain HTTP request on the tunnel path"),)


def test_a_malformed_upgrade_is_400_naming_the_problem() -> None:
    """An upgrade that breaks RFC 6455 4.2.1 (here: POST) gets 400 with the problem, logged."""
    problem = "a WebSocket upgrade must use GET, not POST"
    answer = _answer(Door(OPEN), _request(method="POST"))
    assert answer == Answer(400, _text_answer("400 Bad Request", problem),
                            (LogLine(logging.INFO, f"{PEER}: {problem}"),))


def test_an_upgrade_without_the_subprotocol_is_400_naming_it() -> None:
    """A WebSocket client that does not offer wstunnel.v1 is told to."""
    answer = _answer(Door(OPEN), _request(subprotocol=False))
    text = f"this is a wstunnel relay; use subprotocol {ws.SUBPROTOCOL}"
    assert answer == Answer(400, _text_answer("400 Bad Request", text))


def test_no_auth_lets_in_the_anonymous_agent_and_the_session_starts() -> None:
    """With no_auth a good upgrade is accepted as "anonymous" with the relay's policy; the
    101 carries the accept key and subprotocol, and bytes sent after the request reach
    the session."""
    agent = TunnelProtocol(mux.Role.AGENT)
    outcome, handshake = _knock(Door(OPEN), _request("/tunnel?v=1") + agent.data_to_send())
    assert _accepted(outcome) == ("anonymous", repr(OPEN.policy), PEER, ())
    response, protocol = Door(OPEN).start_session(handshake)
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert f"\r\nSec-WebSocket-Protocol: {ws.SUBPROTOCOL}\r\n".encode() in response
    assert any(isinstance(e, mux.SettingsReceived) for e in protocol.events_received())


def test_a_resumable_session_counts_the_records_that_came_with_the_request() -> None:
    """Records the agent sent right behind its upgrade request count as received in a
    resumable session (else a resume would replay them, and they would arrive twice)."""
    agent = TunnelProtocol(mux.Role.AGENT)
    agent.open_channel("db", 5432, early_data=b"hello")
    _, handshake = _knock(Door(OPEN), _request() + agent.data_to_send())
    _, protocol = Door(OPEN).start_session(handshake, resumable=True)
    assert protocol.replay is not None and protocol.replay.received == 3  # SETTINGS, OPEN, DATA


def test_the_session_runs_under_the_relays_limits_from_the_latest_load() -> None:
    """The protocol a session starts with has the configured limits (the multiplexer's
    channel cap one above max_channels: the relay's own check refuses first, and logs),
    and a reload's limits apply to the next session."""
    door = Door(OPEN)
    door.reconfigure(RelayConfig(
        listen=OPEN.listen, no_auth=True, max_channels=7, max_message_size=1 << 20,
        initial_window=1 << 17, max_chunk_size=1 << 14, max_send_window=1 << 22,
        max_queued_size=1 << 23))
    _, handshake = _knock(door, _request())
    _, protocol = door.start_session(handshake)
    assert protocol.limits == SessionLimits(
        max_channels=8, max_message_size=1 << 20, initial_window=1 << 17,
        max_chunk_size=1 << 14, max_send_window=1 << 22, max_queued_size=1 << 23,
        max_buffered_size=256 << 20)


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored_with_a_debug_line() -> None:
    """Without trusted_proxies the header changes nothing but a debug line."""
    outcome, _ = _knock(Door(OPEN), _request(headers=("X-Forwarded-For: 198.51.100.7",)))
    line = LogLine(logging.DEBUG, f"{PEER}: X-Forwarded-For '198.51.100.7' ignored "
                                  f"(peer not in trusted_proxies)")
    assert _accepted(outcome) == ("anonymous", repr(OPEN.policy), PEER, (line,))


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client() -> None:
    """Behind a trusted proxy the client is named "client via proxy" and failed logins are
    counted by the client's address."""
    config = RelayConfig(listen=OPEN.listen, agents=AGENTS,
                         trusted_proxies=(parse_trusted_proxy("192.0.2.0/24"),))
    forwarded = ("X-Forwarded-For: 198.51.100.7",)
    outcome, _ = _knock(Door(config), _request(headers=forwarded + _login(TOKEN)))
    assert isinstance(outcome, Accepted) and outcome.peer == f"198.51.100.7 via {PEER}"
    answer = _answer(Door(config), _request(headers=forwarded))
    assert answer.log == _warning(f"198.51.100.7 via {PEER}: authentication failed from "
                                  f"198.51.100.7: no Authorization header")


# -- logins -----------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "problem"), [
    ((), "no Authorization header"),
    (("Authorization: Basic YTE6eA==",), "not a Bearer token"),
    (_login(WRONG_TOKEN), "wrong token for agent 'a1'"),
    (_login("b9.c2VjcmV0"), "token for unknown agent 'b9'"),
    (_login("no-dot"), "not a wstunnel token (NAME.SECRET)"),
])
def test_every_failed_login_gets_the_same_401_and_the_log_says_why(
    headers: tuple[str, ...], problem: str
) -> None:
    """Missing, malformed, unknown and wrong tokens all get the same 401 bytes, counted
    as a failed login; only the warning says which."""
    answer = _answer(Door(LOGINS), _request(headers=headers))
    assert answer == Answer(401, UNAUTHORIZED, _warning(
        f"{PEER}: authentication failed from 192.0.2.1: {problem}"), failed_login=True)


def test_the_right_token_lets_its_agent_in_with_its_policy() -> None:
    """An agent's token (the scheme in any case) logs in as that agent, silently."""
    for header in (f"Authorization: Bearer {TOKEN}", f"Authorization: bearer   {TOKEN}"):
        outcome, _ = _knock(Door(LOGINS), _request(headers=(header,)))
        assert _accepted(outcome) == ("a1", "Policy(['127.0.0.1/32:22'])", PEER, ())


def _hold_sessions(door: Door, token: str, count: int) -> list[Seat]:
    """``count`` new sessions let in for ``token``'s agent: their seats, taken."""
    seats = [_accepted_seat(_knock(door, _request(headers=_login(token)))[0])
             for _ in range(count)]
    assert all(seat.taken for seat in seats)
    return seats


def _accepted_seat(outcome: Outcome) -> Seat:
    assert isinstance(outcome, Accepted), outcome
    return outcome.seat


def test_an_agent_at_max_sessions_per_agent_gets_429() -> None:
    """The right token is refused with 429 (Retry-After 30, not a failed login) once its
    agent's logins have taken max_sessions_per_agent seats (sessions not started yet
    count), and let in again once one is released (twice is once)."""
    door = Door(LOGINS)
    seats = _hold_sessions(door, TOKEN, 2)
    assert _accepted_seat(_knock(door, _request(), Visitor(PEER, "192.0.2.1", "c1"))[0]).taken
    answer = _answer(door, _request(headers=_login(TOKEN)))
    assert answer == Answer(429, _text_answer(
        "429 Too Many Requests", "agent a1 has too many sessions", "Retry-After: 30"),
        _warning(f"{PEER}: agent a1 already has 2 sessions (max_sessions_per_agent); refused"))
    seats[0].release()
    seats[0].release()
    assert not seats[0].taken
    assert _accepted_seat(_knock(door, _request(headers=_login(TOKEN)))[0]).taken
    assert _answer(door, _request(headers=_login(TOKEN))).status == 429


def test_a_seat_passed_in_is_the_one_taken_and_no_auth_takes_none() -> None:
    """The connection's seat (``enter(seat=...)``) is the one a new session takes, also
    after a scrypt check; a relay with no_auth has no per-agent limit (takes none)."""
    door, seat = Door(LOGINS), Seat()
    outcome, handshake = _knock(door, _request(headers=_login(OLD_TOKEN)), seat=seat)
    assert isinstance(outcome, NeedsLogin) and not seat.taken
    assert _accepted_seat(door.finish_login(handshake, outcome, True, now=0.0)) is seat
    assert seat.taken
    open_door = Door(dataclasses.replace(OPEN, max_sessions_per_agent=1))
    for _ in range(3):
        assert not _accepted_seat(_knock(open_door, _request())[0]).taken


@pytest.mark.parametrize(("cert_name", "headers", "result"), [
    ("c1", (), "c1"),
    ("c1", ("Authorization: Basic YTE6eA==",), "c1"),
    ("a1", _login(TOKEN), "a1"),
    ("zz", _login(TOKEN), "client certificate for unknown agent 'zz'"),
    ("a1", (), "no Authorization header"),
    ("c1", _login(TOKEN), "token for agent 'a1' with another agent's client certificate"),
])
def test_a_client_certificate_names_the_agent_and_a_token_must_match_it(
    cert_name: str, headers: tuple[str, ...], result: str
) -> None:
    """Mutual TLS: the certificate's name is the agent; it suffices when the agent has no
    token_hash; a token sent with it must be that agent's."""
    outcome, _ = _knock(Door(LOGINS), _request(headers=headers),
                        Visitor(PEER, "192.0.2.1", cert_name))
    if isinstance(outcome, Accepted):
        assert outcome.identity.name == result
    else:
        assert isinstance(outcome, Answer) and outcome.status == 401
        assert outcome.log[0].text.endswith(f"from 192.0.2.1: {result}")


def test_a_source_that_keeps_failing_is_logged_once_per_interval_but_never_locked_out() -> None:
    """Five failures from one address are logged each; the sixth says the rest are logged
    once per 6 s and the seventh is silent; 6 s later one is logged again. Another address
    is logged as usual, and the right token from the failing address still gets in."""
    door = Door(LOGINS)
    logs = [_answer(door, _request(headers=_login(WRONG_TOKEN)), now=0.0).log
            for _ in range(7)]
    line = f"{PEER}: authentication failed from 192.0.2.1: wrong token for agent 'a1'"
    assert logs[:5] == [_warning(line)] * 5
    assert logs[5] == _warning(f"{line}; more failures from 192.0.2.1 are logged at most one "
                               f"per 6 s")
    assert logs[6] == ()
    assert _answer(door, _request(), now=6.0).log[0].text.endswith("no Authorization header")
    other = Visitor("192.0.2.2:1", "192.0.2.2")
    assert len(_answer(door, _request(), other).log) == 1
    assert isinstance(_knock(door, _request(headers=_login(TOKEN)), now=0.0)[0], Accepted)


def test_a_scrypt_token_needs_one_slow_check_then_is_remembered() -> None:
    """An unchecked scrypt token is handed back for the slow check (lane 0 from a clean
    source); a pass lets the agent in, and its next login needs no slow check."""
    door = Door(LOGINS)
    outcome, handshake = _knock(door, _request(headers=_login(OLD_TOKEN)))
    assert outcome == NeedsLogin(AGENTS[1], OLD_TOKEN, "192.0.2.1", 0, PEER)
    assert isinstance(outcome, NeedsLogin)
    accepted = ("old", "Policy([])", PEER, ())
    assert _accepted(door.finish_login(handshake, outcome, True, now=0.0)) == accepted
    assert _accepted(_knock(door, _request(headers=_login(OLD_TOKEN)))[0]) == accepted


def test_a_failed_scrypt_check_is_401_and_puts_the_source_in_the_slow_lane() -> None:
    """A scrypt check that fails gets the usual 401; a source with failures on its record
    still gets its check, in lane 1 (behind clean sources)."""
    door = Door(LOGINS)
    outcome, handshake = _knock(door, _request(headers=_login(OLD_TOKEN)))
    assert isinstance(outcome, NeedsLogin)
    answer = door.finish_login(handshake, outcome, False, now=0.0)
    assert answer == Answer(401, UNAUTHORIZED, _warning(
        f"{PEER}: authentication failed from 192.0.2.1: wrong token for agent 'old'"),
        failed_login=True)
    again, _ = _knock(door, _request(headers=_login(OLD_TOKEN)))
    assert isinstance(again, NeedsLogin) and again.lane == 1


def test_a_saturated_scrypt_budget_is_503_logged_once_per_10_s() -> None:
    """No room for the check: 503 with Retry-After 1, not a failed login; the warning
    comes once per 10 s and counts the 503s since the last one."""
    door = Door(LOGINS)
    answers: list[Answer] = []
    for now in (0.0, 5.0, 10.0):
        outcome, handshake = _knock(door, _request(headers=_login(OLD_TOKEN)), now=now)
        assert isinstance(outcome, NeedsLogin)
        answer = door.finish_login(handshake, outcome, None, now=now)
        assert isinstance(answer, Answer)
        answers.append(answer)
    response = _text_answer("503 Service Unavailable", "the relay is busy checking logins; "
                            "try again in a second", "Retry-After: 1")
    assert [(a.status, a.response, a.failed_login) for a in answers] == [(503, response, False)] * 3
    counts = [line.text.split("(")[1].split(" ")[0] for a in answers for line in a.log]
    assert counts == ["1", "2"]
    assert answers[0].log[0].text.endswith(
        "the latest for agent old): give agents tokens from `wstunnel keygen --token NAME`, "
        "whose hmac-sha256 hashes cost nothing")


def test_a_reload_replaces_the_agents_and_keeps_the_failure_record() -> None:
    """After reconfigure a removed agent's token is unknown, a new one works, and the
    failures counted before the reload still quieten the log."""
    door = Door(LOGINS)
    for _ in range(5):
        _answer(door, _request())
    token = new_token("b2")
    door.reconfigure(RelayConfig(listen=OPEN.listen, agents=(AgentAccount("b2",
                                                                          hash_token(token)),)))
    assert isinstance(_knock(door, _request(headers=_login(token)))[0], Accepted)
    answer = _answer(door, _request(headers=_login(TOKEN)))
    assert answer.log[0].text.endswith("token for unknown agent 'a1'; more failures from "
                                       "192.0.2.1 are logged at most one per 6 s")


def test_the_door_does_no_io() -> None:
    """door.py imports no trio, socket, ssl, time or threading: it is driven with values."""
    tree = ast.parse(Path(door_module.__file__).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not names & {"trio", "socket", "ssl", "time", "threading", "asyncio", "select"}


# -- the HTTP transports' requests (framing.py markers) -------------------------------------

def _http(method: str = "POST", transport: str = "polling", *extra: str) -> bytes:
    return _request(method=method, upgrade=False, subprotocol=False,
                    headers=(f"X-Wstunnel-Transport: {transport}", "Content-Length: 0", *extra))


def test_http_transport_request_is_logged_in_like_an_upgrade() -> None:
    """A plain request carrying the transport marker is not answered 426: a good token
    lets it in, a wrong one gets the same 401 as an upgrade's; an unknown transport
    name is a 400 that says which names exist."""
    door = Door(LOGINS)
    accepted, _ = _knock(door, _http("POST", "polling", *_login(TOKEN)))
    assert isinstance(accepted, Accepted) and accepted.identity.name == "a1"
    assert _answer(door, _http("POST", "streaming", *_login(WRONG_TOKEN))).response == UNAUTHORIZED
    unknown = _answer(door, _http("POST", "carrier-pigeon", *_login(TOKEN)))
    assert unknown.status == 400 and b"streaming, polling" in unknown.response


def test_joining_a_session_is_not_a_new_session() -> None:
    """An agent at max_sessions_per_agent may still send requests for the sessions it
    holds (they carry a session id), and they pass while the relay drains; a new
    session is refused (429, 503)."""
    door = Door(LOGINS)
    _hold_sessions(door, TOKEN, 2)
    joining = _http("GET", "polling", *_login(TOKEN), "X-Wstunnel-Session: abc")
    assert not _accepted_seat(_knock(door, joining)[0]).taken
    assert isinstance(_knock(door, joining, stopping=True)[0], Accepted)
    assert _answer(door, _http("POST", "polling", *_login(TOKEN))).status == 429
    assert _answer(door, _http("POST", "polling", *_login(TOKEN)), stopping=True).status == 503


@pytest.mark.parametrize("transport", ["polling", "streaming"])
def test_an_http_resume_passes_like_an_upgrade_resume(transport: str) -> None:
    """An HTTP-transport opening request with a resume ticket, from an agent at
    max_sessions_per_agent, passes the limit and the drain as an upgrade with one does
    (docs/PROTOCOL.md §12); one asking for a new resumable session does not."""
    door = Door(LOGINS)
    _hold_sessions(door, TOKEN, 2)
    resume = _http("POST", transport, *_login(TOKEN), "X-Wstunnel-Resume: id secret 0")
    assert not _accepted_seat(_knock(door, resume)[0]).taken
    assert isinstance(_knock(door, resume, stopping=True)[0], Accepted)
    fresh = _http("POST", transport, *_login(TOKEN), "X-Wstunnel-Resume: new")
    assert _answer(door, fresh).status == 429
    assert _answer(door, fresh, stopping=True).status == 503


def test_a_resume_that_gets_a_new_session_takes_a_seat_when_there_is_one() -> None:
    """A resume the relay cannot honour becomes a new session (``admit_new_session``):
    it takes the request's seat below the limit, gets 429 at it (seat not taken), and
    503 while the relay drains."""
    door = Door(LOGINS)
    seats = _hold_sessions(door, TOKEN, 1)
    outcome, handshake = _knock(door, _request(headers=(*_login(TOKEN),
                                                        "X-Wstunnel-Resume: id secret 0")))
    assert isinstance(outcome, Accepted) and not outcome.seat.taken
    draining = door.admit_new_session(handshake, outcome, stopping=True)
    assert draining is not None and draining.status == 503 and not outcome.seat.taken
    assert door.admit_new_session(handshake, outcome, stopping=False) is None
    assert outcome.seat.taken
    other, handshake = _knock(door, _request(headers=(*_login(TOKEN),
                                                      "X-Wstunnel-Resume: id secret 0")))
    assert isinstance(other, Accepted)
    refusal = door.admit_new_session(handshake, other, stopping=False)
    assert refusal is not None and refusal.status == 429 and not other.seat.taken
    seats[0].release()
    assert door.admit_new_session(handshake, other, stopping=False) is None


def test_a_session_not_yours_is_refused_like_a_bad_login() -> None:
    """``refuse_session`` gives exactly the bytes of a wrong token's 401."""
    door = Door(LOGINS)
    accepted, handshake = _knock(door, _http("GET", "polling", *_login(TOKEN)))
    assert isinstance(accepted, Accepted)
    answer = door.refuse_session(handshake, accepted, "no such session", now=0.0)
    assert answer.response == UNAUTHORIZED and answer.failed_login


def test_absolute_form_targets_are_routed_by_their_path() -> None:
    """A request in absolute form (as a forwarding proxy may pass it on) is routed by its
    path: the health check answers, the tunnel path is the tunnel."""
    door = Door(OPEN)
    health = _request("http://relay.example:8080/health", upgrade=False, subprotocol=False)
    assert _answer(door, health).status == 200
    tunnel = _http("POST", "polling").replace(b"POST /tunnel ", b"POST http://r:1/tunnel ")
    assert isinstance(_knock(door, tunnel)[0], Accepted)
