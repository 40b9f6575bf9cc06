"""What ``wstunnel --help`` and each ``wstunnel COMMAND --help`` say.

Kept apart from the parser so that parser.py stays about which options exist; a
test walks the parser and fails on any option without a help text and on any
command whose help has no example.
"""

from __future__ import annotations

import argparse
from typing import Any, Final

__all__ = ["OPTION_HELP", "command_texts"]

_TOP: Final = (
    "wstunnel carries many TCP connections over one WebSocket session: run the\n"
    "relay outside the firewall, the agent near the user; the agent listens on\n"
    "local ports and each connection to them is tunnelled to a destination the\n"
    "relay allows. Run `wstunnel COMMAND --help` for each command.",
    "  wstunnel demo                       # everything in one process, on loopback\n"
    "  wstunnel relay --listen 8080 --no-auth --allow 127.0.0.1:22\n"
    "  wstunnel agent --relay ws://127.0.0.1:8080/tunnel -L 2222:127.0.0.1:22\n"
    "  ssh -p 2222 localhost               # goes agent -> relay -> 127.0.0.1:22")

_COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "relay": (
        "Serve the tunnel: accept agents' WebSocket sessions (ws://, or wss:// with\n"
        "--tls-cert-file/--tls-key-file), check their tokens, and connect each channel\n"
        "to the destination it asks for if an allow rule permits it. A config file\n"
        "(-c) holds agents and rules; flags given beside it override its values.",
        "  wstunnel relay -c /etc/wstunnel/relay.yaml\n"
        "  wstunnel relay --listen 8080 --no-auth --allow 127.0.0.1:22   # loopback test\n"
        "  wstunnel relay -c relay.yaml --listen 0.0.0.0:8443 \\\n"
        "      --tls-cert-file relay.crt --tls-key-file relay.key"),
    "agent": (
        "Connect to a relay and forward local ports through it: every connection to\n"
        "a -L port becomes a channel to HOST:PORT on the relay's side; a -D port is a\n"
        "SOCKS5/SOCKS4a/HTTP proxy whose every destination the relay resolves; --stdio\n"
        "carries stdin/stdout as one channel (ssh ProxyCommand). The agent\n"
        "reconnects by itself; an http:// or https:// relay URL is taken as ws:// or\n"
        "wss://. Use -c for a config file; flags given beside it override its values.",
        "  wstunnel agent -c agent.yaml\n"
        "  wstunnel agent --relay ws://127.0.0.1:8080/tunnel -L 2222:127.0.0.1:22\n"
        "  wstunnel agent --relay ws://127.0.0.1:8080/tunnel -D 1080   # curl --socks5-hostname\n"
        "  ssh -o ProxyCommand='wstunnel agent --relay wss://relay.example.com/tunnel \\\n"
        "      --token-file laptop.token --stdio %h:%p' db.internal\n"
        "  wstunnel agent --relay wss://relay.example.com:8443/tunnel \\\n"
        "      --relay-fingerprint sha256:... --token-file laptop.token -L 9000:db:5432"),
    "check": (
        "Validate an agent or relay config file without starting anything: every\n"
        "key and value, the rules between them, and that each file it names (token,\n"
        "certificate, key, CA, password files) exists and can be read. Prints a\n"
        "one-line summary and exits 0, or `file:line: key: problem` and exits 2.",
        "  wstunnel check -c configs/relay.yaml\n"
        "  wstunnel check -c /etc/wstunnel/agent.yaml && systemctl restart wstunnel-agent@laptop"),
    "status": (
        "Ask a running agent or relay, through its admin socket (admin_socket in\n"
        "the config, or --admin-socket), for its sessions and channels: destination,\n"
        "age, bytes and rate of each.",
        "  wstunnel status -c /etc/wstunnel/relay.yaml\n"
        "  wstunnel status --socket /run/wstunnel/admin.sock --watch"),
    "demo": (
        "Start a relay, an agent and two test servers in this process, on loopback\n"
        "ports chosen by the system, then run a bulk upload beside an interactive\n"
        "echo through the tunnel and print throughput and round-trip times.",
        "  wstunnel demo\n"
        "  wstunnel demo --size 256MiB"),
    "keygen": (
        "Make what a secured tunnel needs: a self-signed certificate and key for the\n"
        "relay (prints the sha256: fingerprint agents pin), or a new token for an\n"
        "agent (prints the token, and on stderr the agents: entry for relay.yaml).",
        "  wstunnel keygen --out /etc/wstunnel --name relay.example.com\n"
        "  wstunnel keygen --token laptop --out laptop.token"),
    "service": (
        "Print a systemd unit or an example config exactly as shipped with this\n"
        "wstunnel, to install or start from without the source repository. Units:\n"
        "relay, relay-socket, agent (one instance per agent-NAME.yaml); their\n"
        "ExecStart= runs /opt/wstunnel/bin/wstunnel (a venv there, or edit it).\n"
        "Configs: relay, agent, agent-token (the PUBLIC example token agent.yaml\n"
        "names), nginx, haproxy (front ends for the relay).",
        "  wstunnel service print-unit relay > /etc/systemd/system/wstunnel-relay.service\n"
        "  wstunnel service print-unit agent > /etc/systemd/system/wstunnel-agent@.service\n"
        "  wstunnel service print-config relay > /etc/wstunnel/relay.yaml   # then edit it"),
}

OPTION_HELP: Final[dict[str, str]] = {
    "config": "the agent or relay YAML file to check",
    "tls_cert_file": "serve wss://: the certificate chain (PEM), e.g. from `wstunnel keygen`",
    "tls_key_file": "the private key (PEM) of --tls-cert-file",
    "tls_client_ca_file": "require agents to present a client certificate signed by this "
                          "CA (PEM); its CN is the agent name",
    "token_file": "file holding this agent's token (from `wstunnel keygen --token`)",
    "token_env": "environment variable holding this agent's token",
    "token_credential": "systemd credential (LoadCredential=) holding this agent's token",
    "ca_file": "trust this CA (or self-signed certificate, PEM) for the relay "
               "instead of the system's CAs",
    "relay_fingerprint": "accept only the relay certificate with this sha256:... fingerprint "
                         "(as `wstunnel keygen` prints it)",
    "server_name": "name to send (SNI) and expect in the relay's certificate, instead of "
                   "the URL's host",
    "client_cert_file": "client certificate (PEM) to present, for a relay with "
                        "tls.client_ca_file",
    "client_key_file": "private key (PEM) of --client-cert-file",
}


def command_texts(name: str | None = None) -> dict[str, Any]:
    """``description``/``epilog`` keyword arguments for the parser of ``name`` (None: the top)."""
    description, examples = _TOP if name is None else _COMMANDS[name]
    return {"description": description, "epilog": "examples:\n" + examples,
            "formatter_class": argparse.RawDescriptionHelpFormatter}
