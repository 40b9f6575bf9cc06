"""The ``wstunnel`` argument parser: every command, option and help text.

Apart from main.py so that it stays about running the commands. The parser only
says which command was given (``args.command``); main.py picks the function.
"""

from __future__ import annotations

import argparse
from typing import Any, Final

from .. import __version__
from ..config import LOG_FORMATS, LOG_LEVELS, parse_size
from ..config.proxy_url import NO_PROXY
from .helptext import OPTION_HELP, command_texts
from .shipped import add_service_actions

__all__ = ["build_parser"]


class _Once(argparse.Action):
    """An option that may be given once: argparse would keep the last silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and "
                         f"{values}): the relay serves one address; [::]:PORT serves IPv6 and, "
                         "on most systems, IPv4 too")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; global options work before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="log verbosity (default: the config's log_level, else info)")
    common.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS,
                        help="text lines or one JSON object per line")
    parser = argparse.ArgumentParser(prog="wstunnel", parents=[common], **command_texts())
    parser.add_argument("--version", action="version", version=f"wstunnel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=summary, **command_texts(name))

    _add_relay(command("relay", "run the relay"))
    _add_agent(command("agent", "run the agent"))
    check = command("check", "validate a config file and the files it names")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help=OPTION_HELP["config"])
    _add_status(command("status", "show sessions and channels of a running agent/relay"))
    demo = command("demo", "relay+agent+target demo")
    demo.add_argument("--size", type=_size_arg, metavar="SIZE",
                      help="bulk transfer size, e.g. 64MiB")
    _add_keygen(command("keygen", "make a relay certificate or an agent token"))
    service = command("service", "print the shipped systemd units and example configs")
    add_service_actions(service)
    return parser


def _add_keygen(keygen: argparse.ArgumentParser) -> None:
    keygen.add_argument("--out", metavar="PATH",
                        help="write relay.key and relay.crt into the directory PATH; with "
                             "--token, write the token to the file PATH (mode 0600)")
    keygen.add_argument("--token", metavar="NAME",
                        help="make a new token for agent NAME (printed, or written to --out)")
    keygen.add_argument("--name", action="append", default=[], metavar="NAME",
                        help="DNS name or IP address the certificate is for (repeatable)")
    keygen.add_argument("--days", type=int, help="validity of the certificate (default 825)")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")


def _add_relay(relay: argparse.ArgumentParser) -> None:
    relay.add_argument("-c", "--config", metavar="FILE", help="relay YAML file")
    relay.add_argument("--listen", metavar="[HOST:]PORT", action=_Once,
                       help="address to serve on; a bare PORT means 127.0.0.1:PORT (this "
                            "machine only): give 0.0.0.0:PORT or [::]:PORT for every interface")
    relay.add_argument("--allow", action="append", metavar="RULE",
                       help="allowed destination: host, *.pattern, IP or CIDR, "
                            "optional :port or :lo-hi (repeatable; default: nothing)")
    relay.add_argument("--listen-allow", dest="listen_allow", action="append", metavar="RULE",
                       help="with --no-auth: an address agents' -R may listen on: IP or CIDR "
                            "with optional :port or :lo-hi, or unix:/path (repeatable; "
                            "default: nothing)")
    relay.add_argument("--path", help="URL path of the tunnel (default /tunnel)")
    relay.add_argument("--resume-grace", dest="resume_grace", type=float, metavar="SECONDS",
                       help="how long a session whose connection broke waits for its agent "
                            "to resume it (default 60; 0: connections reset at once)")
    relay.add_argument("--trusted-proxy", "--trusted-proxies", dest="trusted_proxies",
                       action="append", metavar="CIDR",
                       help="reverse proxy whose X-Forwarded-For is believed (repeatable)")
    relay.add_argument("--no-auth", action="store_true", default=None,
                       help="accept agents without a token (tests and loopback only)")
    for key in ("cert_file", "key_file", "client_ca_file"):
        relay.add_argument(f"--tls-{key.replace('_', '-')}", dest=f"tls_{key}", metavar="FILE",
                           help=OPTION_HELP[f"tls_{key}"])
    _add_service_flags(relay)


def _add_agent(agent: argparse.ArgumentParser) -> None:
    agent.add_argument("-c", "--config", metavar="FILE", help="agent YAML file")
    agent.add_argument("--relay", metavar="URL", action="append",
                       help="ws:// or wss:// URL of the relay; repeat it for fallbacks, used "
                            "in turn while the first cannot be reached")
    agent.add_argument("-L", dest="forwards", action="append", metavar="[BIND:]PORT:HOST:PORT",
                       help="forward a local port (or /path of a unix socket) to HOST:PORT (or "
                            "unix:/path) via the relay (repeatable)")
    agent.add_argument("--stdio", metavar="HOST:PORT",
                       help="carry stdin/stdout as one connection to HOST:PORT, then exit "
                            "(ssh -o ProxyCommand='wstunnel agent ... --stdio %%h:%%p')")
    agent.add_argument("-D", dest="dynamic_forwards", action="append", metavar="[BIND:]PORT",
                       type=lambda text: {"dynamic": text},
                       help="SOCKS5/SOCKS4a/HTTP proxy on a local port; the relay connects "
                            "to each destination a client asks for (repeatable)")
    agent.add_argument("-R", dest="reverse_forwards", action="append",
                       metavar="[BIND:]PORT:HOST:PORT", type=lambda text: {"reverse": text},
                       help="the relay listens on BIND:PORT (default 127.0.0.1, on the relay "
                            "host) while this agent is connected; this agent connects each "
                            "connection to HOST:PORT (repeatable; the relay's listen_allow "
                            "must allow it)")
    proxy = agent.add_mutually_exclusive_group()
    proxy.add_argument("--proxy", metavar="URL",
                       help="HTTP proxy http://[USER@]HOST:PORT (default: HTTPS_PROXY/HTTP_PROXY)")
    proxy.add_argument("--no-proxy", dest="proxy", action="store_const", const=NO_PROXY,
                       help="connect directly, ignoring HTTPS_PROXY/HTTP_PROXY")
    agent.add_argument("--proxy-password-file", metavar="FILE",
                       help="file holding the proxy password (keeps it off the command line)")
    agent.add_argument("--header", "--headers", dest="headers", action="append",
                       metavar="'NAME: VALUE'", help="extra upgrade header (repeatable)")
    agent.add_argument("--host-header", metavar="HOST[:PORT]",
                       help="Host header to send instead of the relay URL's host")
    agent.add_argument("--transport", choices=("auto", "websocket", "streaming", "polling"),
                       help="how to reach the relay: auto (default) tries WebSocket, then "
                            "HTTP streaming, then HTTP polling")
    agent.add_argument("--user-agent", metavar="TEXT",
                       help="User-Agent of the requests to the relay and the proxy")
    for key, meta in _AGENT_SECURITY_FLAGS.items():
        agent.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar=meta,
                           help=OPTION_HELP[key])
    agent.add_argument("--insecure-skip-verify", action="store_true", default=None,
                       help="do not check the relay's certificate (logs a warning)")
    _add_service_flags(agent)


_AGENT_SECURITY_FLAGS: Final = {
    "token_file": "FILE", "token_env": "VAR", "token_credential": "NAME", "ca_file": "FILE",
    "relay_fingerprint": "SHA256", "server_name": "HOST", "client_cert_file": "FILE",
    "client_key_file": "FILE"}


def _add_service_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics and a "
                        "live dashboard on http://HOST:PORT/")
    parser.add_argument("--metrics-auth-file", metavar="FILE",
                        help="require HTTP Basic auth on --metrics: one user:password (or "
                        "user:sha256:HEX) a line")
    parser.add_argument("--admin-socket", metavar="PATH",
                        help="unix socket (mode 0600) for `wstunnel status`")
    parser.add_argument("--access-log", metavar="off|on|FILE",
                        help="one line per finished channel (--log-format), into the log "
                        "(on) or appended to FILE, reopened on SIGHUP/SIGUSR1 (default off)")


def _add_status(status: argparse.ArgumentParser) -> None:
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", metavar="FILE", help="read admin_socket from this config")
    where.add_argument("--socket", metavar="PATH", help="the admin socket to ask")
    status.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
