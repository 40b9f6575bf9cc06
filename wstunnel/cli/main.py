"""The ``wstunnel`` command: ``relay``, ``agent``, ``check`` and ``demo``.

Theory of operation
-------------------
Each subcommand is a short function, picked by the command parser.py parsed:
build the config (a YAML file with ``-c``, flags on top of it, or flags alone),
set up logging, then run the role under ``trio.run``. This is the only module
that calls ``trio.run``, sets up logging or handles signals: SIGINT/SIGTERM set
a ``shutdown`` event that the role watches (stop accepting, GOAWAY, drain); a
second signal aborts at once.

Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error.
Expected failures (a port already in use, a refused handshake) are logged as
one line saying what failed and what to do next; only bugs get a traceback.
The roles and the demo are imported inside their subcommands, so ``check``
works without them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from ..config import DEFAULT_MAX_CHANNELS, AgentConfig, load_config
from ..config.flags import agent_config, relay_config
from ..errors import ConfigError, TunnelError
from ..service.logs import setup_logging
from .parser import build_parser
from .shipped import print_shipped

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main", "main_entry"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2

if TYPE_CHECKING:  # (an agent never loads the relay's config classes: config/relay_model.py)
    from ..config import RelayConfig

    Config = AgentConfig | RelayConfig

log = logging.getLogger("wstunnel.cli")
Runner = Callable[..., Awaitable[None]]

_LISTEN_ERRORS: Final = {
    errno.EADDRINUSE: ("address already in use", "pick another {flag}"),
    errno.EACCES: ("permission denied", "ports below 1024 need privileges; pick a higher one"),
    errno.EADDRNOTAVAIL: ("no such address on this machine",
                          "use one of its addresses, e.g. 127.0.0.1"),
}


class _ForcedExit(Exception):
    """A second SIGINT/SIGTERM arrived while draining."""


class _Stopped(Exception):
    """``--stdio`` ended by SIGTERM or SIGHUP, its cleanup done."""


# ------------------------------------------------------------------ config

def relay_config_from_args(args: argparse.Namespace) -> RelayConfig:
    """The relay config: ``-c FILE`` if given, with flags replacing its values."""
    return relay_config(args.config, _config_options(args))


def agent_config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent config: ``-c FILE`` if given, with flags replacing its values."""
    return agent_config(args.config, _config_options(args))


_NOT_CONFIG: Final = ("command", "config")


def _config_options(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options that write config keys (config/flags.py maps them)."""
    return {dest: value for dest, value in vars(args).items() if dest not in _NOT_CONFIG}


# ------------------------------------------------------------- subcommands

def _cmd_check(args: argparse.Namespace) -> int:
    from ..config.files import check_config

    _early_logging(args, "info")
    config = check_config(args.config)
    print(f"{config.source}: OK \N{EM DASH} {_summary(config)}")
    return EXIT_OK


def _early_logging(args: argparse.Namespace, default_level: str) -> None:
    """Loading the config may say something (an http:// relay URL taken as ws://)
    before the config's own log settings are known."""
    setup_logging(getattr(args, "log_level", default_level), getattr(args, "log_format", "text"))


def _summary(config: Config) -> str:
    if isinstance(config, AgentConfig):
        count = len(config.forwards)
        relays = " or ".join(url.url for url in config.relay_urls)
        return f"agent, {count} forward{'s' * (count != 1)} to {relays}"
    scheme = "wss" if config.tls is not None else "ws"
    if config.no_auth:
        rules = len(config.allow)
        refused = " (every destination refused)" if not rules else ""
        access = f"NO AUTHENTICATION, {rules} allow rule{'s' * (rules != 1)}{refused}"
    else:
        count = len(config.agents)
        access = f"{count} agent{'s' * (count != 1)}" + (" (every agent refused)"
                                                         if not count else "")
    return f"relay on {scheme}://{config.listen}{config.path}, {access}"


def _cmd_relay(args: argparse.Namespace) -> int:
    config = relay_config_from_args(args)
    setup_logging(config.log_level, config.log_format, access_log=config.access_log)
    from ..relay import run_relay

    return _run_role(run_relay, config, functools.partial(relay_config_from_args, args))


def _cmd_agent(args: argparse.Namespace) -> int:
    _early_logging(args, "warning" if getattr(args, "stdio", None) else "info")
    config = agent_config_from_args(args)
    if config.stdio is not None:
        return _run_stdio(config, getattr(args, "log_level", None))
    setup_logging(config.log_level, config.log_format, access_log=config.access_log)
    from ..agent import run_agent

    return _run_role(run_agent, config, functools.partial(agent_config_from_args, args))


def _cmd_status(args: argparse.Namespace) -> int:
    from ..service.admin import show_status

    _imports_done()  # (--watch runs until Ctrl-C)
    path = args.socket
    if path is None:
        path = load_config(args.config).admin_socket
        if path is None:
            raise ConfigError(f"{args.config}: no admin_socket is configured; add "
                              "`admin_socket: /run/wstunnel/admin.sock` and restart")
    return show_status(path, watch=args.watch)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .keygen import (
        DEFAULT_CERT_DAYS,
        print_token,
        refuse_certificate_options,
        write_certificate,
    )

    if args.token is not None:
        refuse_certificate_options(args.name, args.days)
        print_token(args.token, out=args.out, force=args.force, stdout=sys.stdout,
                    stderr=sys.stderr)
    elif args.out is None:
        raise ConfigError("say what to make: --out DIR (a relay certificate) or --token NAME "
                          "[--out FILE] (an agent token)")
    else:
        days = DEFAULT_CERT_DAYS if args.days is None else args.days
        write_certificate(args.out, args.name, days=days, force=args.force,
                          stdout=sys.stdout)
    return EXIT_OK


def _cmd_service(args: argparse.Namespace) -> int:
    return print_shipped(args.folder, args.name, out=sys.stdout, err=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(getattr(args, "log_level", "warning"), getattr(args, "log_format", "text"))
    import trio

    from ..service.malloc_tuning import keep_buffers_in_heap
    from .demo import run_demo

    keep_buffers_in_heap()
    options = {"size": args.size} if args.size is not None else {}
    return _guarded(lambda: trio.run(functools.partial(run_demo, **options)), None)


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "relay": _cmd_relay, "agent": _cmd_agent, "check": _cmd_check, "status": _cmd_status,
    "demo": _cmd_demo, "keygen": _cmd_keygen, "service": _cmd_service}


# ----------------------------------------------------------------- running

def _run_role(runner: Runner, config: Config, reread: Callable[[], Config]) -> int:
    """Run ``runner(config, shutdown=...)`` until it returns; map failures to exit codes."""
    import trio

    from ..service.malloc_tuning import keep_buffers_in_heap
    from ..service.open_files import raise_open_files_limit

    def run() -> int:
        keep_buffers_in_heap()
        if isinstance(config, AgentConfig):  # as many as a relay with the default
            raise_open_files_limit(DEFAULT_MAX_CHANNELS, "agent")  # max_channels lets it open
        else:
            raise_open_files_limit(config.max_channels, "relay")
        trio.run(_supervise, runner, config, reread)
        return EXIT_OK

    return _guarded(run, config)


def _run_stdio(config: AgentConfig, log_level: str | None) -> int:
    """``--stdio``: one channel over stdin/stdout. stderr is the ssh user's terminal,
    so only warnings and the one line saying why it failed, unless --log-level."""
    setup_logging(log_level or "warning", config.log_format)
    import trio

    from ..agent.stdio import run_stdio
    from ..net.channel_table import is_session_loss

    if logging.getLogger("wstunnel").getEffectiveLevel() > logging.INFO:
        # The one channel's end is the one line StdioFailed gives; the session's lines
        # about losing (or keeping) its channels would say it before, twice.
        for handler in logging.getLogger("wstunnel").handlers:
            handler.addFilter(lambda record: not is_session_loss(record))

    assert config.stdio is not None
    target = config.stdio

    def run() -> int:
        trio.run(_stdio_until_signal, run_stdio, config, target)
        return EXIT_OK

    return _guarded(run, config)


async def _stdio_until_signal(run_stdio: Runner, config: AgentConfig, target: object) -> None:
    """ssh sends its ProxyCommand SIGHUP when it exits: dying of it (or of SIGTERM)
    would skip run_stdio's cleanup, leaving stdin/stdout non-blocking and the relay
    holding the destination open for a resume that never comes. So these signals
    cancel it instead, and end in ``_Stopped`` (exit 1, quietly: ssh has gone)."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals)
            await run_stdio(config, target)
            nursery.cancel_scope.cancel()


async def _stop_on_signal(signals: Any) -> NoReturn:
    async for signum in signals:
        raise _Stopped(signal.Signals(signum).name)
    raise AssertionError("signal receiver ended")  # pragma: no cover


async def _supervise(runner: Runner, config: Config, reread: Callable[[], Config]) -> None:
    import trio

    from ..service.runner import run_service
    from ..service.systemd import listen_sockets

    shutdown = trio.Event()
    hangup_send, hangups = trio.open_memory_channel[None](1)
    sockets = None if isinstance(config, AgentConfig) else listen_sockets()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, shutdown, hangup_send)
        await run_service(runner, config, shutdown=shutdown, hangups=hangups,
                          load_config=reread, on_reload=_relog, sockets=sockets)
        nursery.cancel_scope.cancel()


def _relog(config: Config) -> None:
    try:
        setup_logging(config.log_level, config.log_format, access_log=config.access_log)
    except ConfigError as exc:  # (the access log's file: the one before stays open)
        log.error("%s; still writing the access log where it went before", exc)


async def _watch_signals(shutdown: Any, hangups: Any, *, task_status: Any) -> NoReturn:
    """SIGHUP: reopen the access log file, ask for a reload. SIGUSR1: reopen the access
    log file (logrotate). First SIGINT/SIGTERM: set ``shutdown``; second: raise
    ``_ForcedExit``."""
    import trio

    from ..service.logs import reopen_log_files

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                   signal.SIGUSR1) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum in (signal.SIGHUP, signal.SIGUSR1):
                reopen_log_files()
            if signum == signal.SIGUSR1:
                log.info("SIGUSR1 received: access log file reopened")
                continue
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: reloading the configuration")
                with contextlib.suppress(trio.WouldBlock):  # one is already pending
                    hangups.send_nowait(None)
                continue
            if shutdown.is_set():
                raise _ForcedExit(name)
            log.info("%s received: draining open channels (send it again to exit now)", name)
            shutdown.set()
    raise AssertionError("signal receiver ended")  # pragma: no cover


def _imports_done() -> None:
    """Turn the cyclic garbage collector back on, which the entry point
    (wstunnel/__main__.py) turned off while importing, before a command's real work.

    What the imports made lives as long as the process: ``gc.freeze()`` keeps it out
    of every later collection, and spares the first one a pass over all of it (~18 ms
    at ``--stdio``'s start; the few hundred KiB of import-time cycles it would free
    stay)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _guarded(call: Callable[[], int], config: Config | None) -> int:
    """Call ``call``; expected failures become one log line and an exit code."""
    _imports_done()
    try:
        return call()
    except BaseException as exc:  # the task root: every failure is reported here
        return _report(exc, config)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and all(isinstance(e, BaseException) for e in inner):
        return [leaf for e in inner for leaf in _leaves(e)]
    return [exc]


def _report(exc: BaseException, config: Config | None) -> int:
    leaves = _leaves(exc)
    if any(isinstance(e, _ForcedExit) for e in leaves):
        log.error("second signal received: exiting without waiting for channels to drain")
        return EXIT_FAILURE
    stopped = [e for e in leaves if isinstance(e, _Stopped)]
    if stopped:
        log.info("%s received: channel closed", stopped[0])
        return EXIT_FAILURE
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        log.error("interrupted")
        return EXIT_FAILURE
    expected = [e for e in leaves if isinstance(e, (OSError, TunnelError))]
    if expected and len(expected) == len(leaves):
        log.error("%s", _explain(expected[0], config))
        return EXIT_USAGE if isinstance(expected[0], ConfigError) else EXIT_FAILURE
    log.critical("unexpected error (a bug; please report it with this traceback)",
                 exc_info=exc)
    return EXIT_FAILURE


def _explain(exc: BaseException, config: Config | None) -> str:
    """One line: what failed and, where we know it, what to do next."""
    if isinstance(exc, OSError) and exc.errno in _LISTEN_ERRORS:
        reason, advice = _LISTEN_ERRORS[exc.errno]
        where, flag = _listen_target(exc, config)
        return f"cannot listen on {where}: {reason} \N{EM DASH} {advice.format(flag=flag)}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


def _listen_target(exc: OSError, config: Config | None) -> tuple[str, str]:
    if isinstance(config, AgentConfig):
        where = " or ".join(str(forward.listen) for forward in config.forwards)
        return (str(exc.filename) if exc.filename else where), "-L port"
    if config is not None:  # a relay's
        return str(config.listen), "--listen port"
    return (str(exc.filename) if exc.filename else "the address"), "port"


# ------------------------------------------------------------- entry points

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage/config).

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        result = _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"wstunnel: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return result


def main_entry() -> NoReturn:
    """Run the command line and exit with its code. The console script is
    ``wstunnel.__main__:main_entry``, which also starts faster (see there)."""
    sys.exit(main())
