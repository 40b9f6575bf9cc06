"""NTLM and Negotiate logins to an HTTP proxy (RFC 4559), with pyspnego (optional).

Corporate proxies often take nothing but NTLM or Kerberos. Both are
multi-step and bind the login to one connection: the proxy answers the first
request 407 offering ``Negotiate`` and/or ``NTLM``, the client sends its first
token, the proxy answers 407 with a challenge, the client its answer, and the
request then passes on that same kept-alive connection. pyspnego makes the
tokens (``pip install 'wstunnel[ntlm]'``); without it the agent says so. The
user comes from the proxy URL (``DOMAIN\\user`` written ``DOMAIN%5Cuser``), the
password from ``proxy_password_file`` (or ``$CREDENTIALS_DIRECTORY``), never
from the command line. Negotiate is preferred when offered: with no Kerberos
ticket it carries NTLM inside SPNEGO.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

import h11

__all__ = ["ConnectionLogin", "connection_schemes", "challenge", "INSTALL_HINT"]

#: The multi-step schemes, most preferred first.
SCHEMES: Final = ("Negotiate", "NTLM")
INSTALL_HINT: Final = "install pyspnego for it (pip install 'wstunnel[ntlm]')"


def connection_schemes(answer: h11.Response) -> list[str]:
    """The multi-step schemes a 407 offers, most preferred first."""
    offered = {value.decode("latin-1").strip().split(" ", 1)[0].lower()
               for name, value in answer.headers if name == b"proxy-authenticate"}
    return [scheme for scheme in SCHEMES if scheme.lower() in offered]


def challenge(answer: h11.Response, scheme: str) -> bytes | None:
    """The token in ``Proxy-Authenticate: SCHEME <base64>``, or None (no token: the
    proxy starts over, i.e. refused the login)."""
    for name, value in answer.headers:
        if name != b"proxy-authenticate":
            continue
        parts = value.decode("latin-1").strip().split(" ", 1)
        if parts[0].lower() == scheme.lower() and len(parts) == 2 and parts[1].strip():
            try:
                return base64.b64decode(parts[1].strip(), validate=True)
            except binascii.Error:
                return None
    return None


class ConnectionLogin:
    """One multi-step login on one connection (a pyspnego client context).

    Raises:
        ImportError: pyspnego is not installed.
    """

    def __init__(self, scheme: str, username: str, password: str, proxy_host: str) -> None:
        import spnego  # noqa: PLC0415  (an optional extra: imported only when a proxy asks)

        self.scheme = scheme
        self.username = username
        self.steps = 0
        self._context: Any = spnego.client(username, password, hostname=proxy_host,
                                           service="HTTP", protocol=scheme.lower())

    def header(self, token: bytes | None) -> str:
        """The ``Proxy-Authorization`` value answering ``token`` (None: the first step)."""
        self.steps += 1
        out = self._context.step(token) or b""
        return f"{self.scheme} {base64.b64encode(out).decode('ascii')}"
