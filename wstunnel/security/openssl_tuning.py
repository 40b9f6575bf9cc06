"""OpenSSL settings Python's ``ssl`` module does not expose: read-ahead and the AES-128 suite first.

Without read-ahead OpenSSL reads every TLS record with two ``read()`` calls
(its 5-byte header, then the body), so a wss:// session paid ~8 system calls
per 64 KiB received. With read-ahead and a 64 KiB read buffer it takes one.
TLS 1.3 suites cannot be ordered from Python 3.11; the client's order decides,
and OpenSSL puts AES-256-GCM first. We offer AES-128-GCM first, as browsers and
``ssh -c aes128-gcm@openssh.com`` do.

Both are set on the ``SSL_CTX`` inside the ``ssl.SSLContext`` through ctypes,
found where CPython keeps it (first field after the object header) and checked
against the options Python reports before anything is changed. Any doubt (not
CPython, symbols not exported, a mismatch) leaves the context as it is: TLS
works the same, only slower. ``net/tls_stream.py`` is read-ahead safe because
it always tries a read before waiting for the socket.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from typing import Final

__all__ = ["READ_BUFFER_SIZE", "TLS13_SUITES", "tune_context"]

log = logging.getLogger("wstunnel")

#: Bytes OpenSSL asks the kernel for per read (four full records).
READ_BUFFER_SIZE: Final = 64 * 1024
TLS13_SUITES: Final = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
_SSL_CTRL_SET_READ_AHEAD: Final = 41  # <openssl/ssl.h>
_SSL_CTRL_GET_READ_AHEAD: Final = 40


def _libssl() -> ctypes.CDLL | None:
    if sys.implementation.name != "cpython":
        return None
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_get_options.argtypes = (ctypes.c_void_p,)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_set_default_read_buffer_len.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.SSL_CTX_set_default_read_buffer_len.restype = None
        lib.SSL_CTX_set_ciphersuites.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    except (ImportError, OSError, AttributeError):
        return None
    return lib


_LIB: Final = _libssl()


def _ssl_ctx(context: ssl.SSLContext, lib: ctypes.CDLL) -> int | None:
    """The ``SSL_CTX *`` of ``context``, or None when it cannot be confirmed."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        return None
    # Two independent readings of the same options must agree, and flipping
    # one through Python must show through the pointer.
    if lib.SSL_CTX_get_options(pointer) != int(context.options):
        return None
    probe = ssl.OP_NO_TICKET
    context.options ^= probe
    seen = lib.SSL_CTX_get_options(pointer) == int(context.options)
    context.options ^= probe
    return pointer if seen else None


def tune_context(context: ssl.SSLContext) -> bool:
    """Read-ahead, a 64 KiB read buffer and AES-128-GCM first; False if left untouched."""
    lib = _LIB
    if lib is None:
        return False
    pointer = _ssl_ctx(context, lib)
    if pointer is None:
        log.debug("OpenSSL context not found where CPython keeps it; TLS runs untuned")
        return False
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    lib.SSL_CTX_set_default_read_buffer_len(pointer, READ_BUFFER_SIZE)
    if not lib.SSL_CTX_set_ciphersuites(pointer, TLS13_SUITES):
        log.debug("OpenSSL refused the TLS 1.3 suite order; keeping its default")
    return bool(lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_READ_AHEAD, 0, None))
