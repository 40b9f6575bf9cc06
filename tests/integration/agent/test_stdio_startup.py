"""``--stdio`` starts with what its one channel needs, and nothing more.

ssh runs ``wstunnel agent --stdio`` as its ProxyCommand once per connection,
so every module the process imports is paid at each ssh (issue 22;
benchmarks/stdio_startup.py measures it). Timing is the benchmark's business;
this test keeps the gain from rotting: a real ``--stdio`` run over ws:// must
finish without loading the listeners, the HTTP transports, TLS, the relay's
rule parsers and config classes or the relay itself. The console script turns
the garbage collector off while importing; the run itself must have it back on
(a relay or agent runs for weeks), with what the imports made frozen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from ..tunnel_helpers import LOOPBACK, echo_handler, relay_config, serve_target, start_relay

ROOT = Path(__file__).resolve().parents[3]

#: Run the console script's entry point, then report on stderr's last two lines (stdout
#: is the channel's) the collector's state and the modules the run loaded.
CHILD = """\
import atexit, gc, sys

def report():
    sys.stderr.write(f"\\ncollector on: {gc.isenabled()}, frozen: {gc.get_freeze_count() > 0}")
    sys.stderr.write("\\nloaded: " + " ".join(sorted(sys.modules)) + "\\n")

atexit.register(report)
sys.argv[0] = "wstunnel"
from wstunnel.__main__ import main_entry
main_entry()
"""

#: What an agent over ws:// with one stdio channel never needs.
NOT_NEEDED = (
    "wstunnel.agent.forwards", "wstunnel.agent.dynamic", "wstunnel.agent.socks",
    "wstunnel.agent.udp", "wstunnel.agent.kinds",  # the -L/-D listeners
    "wstunnel.agent.http_",  # http_transport/_client/_polling: only when WebSocket does not pass
    "wstunnel.security.tls",  # wss:// only
    "wstunnel.security.policy", "wstunnel.security.allow_rule",  # the relay's rules
    "wstunnel.security.listen_policy",
    "wstunnel.config.relay_model",  # the relay's config classes
    "wstunnel.relay", "wstunnel.service.runner", "wstunnel.service.reload",
    "wstunnel.service.dashboard_server", "difflib", "yaml", "cryptography",
)


async def test_stdio_over_ws_loads_none_of_what_it_does_not_need() -> None:
    async with trio.open_nursery() as nursery:
        relay = await start_relay(nursery, relay_config())
        echo = await serve_target(nursery, echo_handler)
        argv = [sys.executable, "-c", CHILD, "agent", "--no-proxy", "--relay",
                f"ws://{LOOPBACK}:{relay.ports[0]}/tunnel", "--stdio", f"{LOOPBACK}:{echo}"]
        with trio.fail_after(30):
            result = await trio.run_process(argv, stdin=b"ping", capture_stdout=True,
                                            capture_stderr=True, check=False, cwd=ROOT)
        nursery.cancel_scope.cancel()
    assert (result.returncode, result.stdout) == (0, b"ping"), result.stderr.decode()
    collector, modules = result.stderr.decode().splitlines()[-2:]
    loaded = set(modules.removeprefix("loaded: ").split())
    assert "wstunnel.agent.stdio" in loaded  # (the report is the real run's)
    assert sorted(name for name in loaded if name.startswith(NOT_NEEDED)) == []
    assert collector == "collector on: True, frozen: True"
