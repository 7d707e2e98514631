"""The scam-back command: the original's flags (-p -u -g -f -b -P -D -T -h) plus -t; main() -> exit code."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional, Sequence

from . import __version__
from . import config as configmod
from . import daemon
from . import log as logmod
from . import placement
from . import ctl
from . import routing

log = logging.getLogger("scam-back")

USAGE = """\
usage: scam-back -p SOCKET [-u USER] [-g GROUP] [-f CONFIG] [-b CACHEFILE] [-P PIDFILE]
                 [-T TIMEOUT] [-D] [-t] [-h]
  -p SOCKET    milter socket: unix:/path, local:/path, inet:PORT@HOST, inet6:PORT@HOST
  -u USER      run as this user (required when started as root)
  -g GROUP     run with this group (the socket becomes group read-write)
  -f CONFIG    config file (default /etc/mail/scam.conf)
  -b CACHEFILE cache file, read at start and saved periodically and at exit
               (BackList in the config overrides it)
  -P PIDFILE   pid file (default /var/spool/scam/scam-back.pid)
  -T TIMEOUT   libmilter timeout in seconds
  -D           detach and run in the background
  -t           check the config (and mailertable) and exit: 0 good, 78 bad
  -h           this help and the features in effect
"""
SOCKET_RE = re.compile(r"^(?:(?:unix|local):/.+|inet6?:\d{1,5}(?:@.+)?|/.+)$")


class UsageError(Exception):
    """A bad command line: print the usage and exit 64."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="scam-back", add_help=False, usage=USAGE)
    parser.add_argument("-p", dest="socket")
    parser.add_argument("-u", dest="user")
    parser.add_argument("-g", dest="group")
    parser.add_argument("-f", dest="config", default=configmod.DEFAULT_CONFIG_PATH)
    parser.add_argument("-b", dest="cache_file")
    parser.add_argument("-P", dest="pid_file", default="/var/spool/scam/scam-back.pid")
    parser.add_argument("-T", dest="timeout")
    parser.add_argument("-D", dest="detach", action="store_true")
    parser.add_argument("-t", dest="check", action="store_true")
    parser.add_argument("-h", dest="help", action="store_true")
    parser.add_argument("-v", dest="version", action="store_true")
    return parser


def _features(path: str) -> str:
    try:
        config = configmod.load(path)
        source = f"features in effect ({path}):"
    except configmod.ConfigError as exc:
        config = configmod.Config(helo_name="-")
        source = f"features in effect (defaults; {exc}):"
    return "\n".join([f"scam-back {__version__}", source] + [f"  {f}" for f in config.features()])


def load_all(path: str) -> tuple[configmod.Config, routing.Router]:
    """Config and routing, with every warning logged; ConfigError if either is bad."""
    config, router, warnings = routing.load(path)
    for warning in warnings:
        log.warning("%s", warning)
    return config, router


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, check the config before anything else, then serve; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:
        return ctl.main(argv[1:])
    try:
        args = _parser().parse_args(argv)
        if args.timeout is not None and not re.fullmatch(r"\d{1,6}", args.timeout):
            raise UsageError(f"-T {args.timeout}: not a number of seconds")
        if not (args.help or args.version or args.check):
            if not args.socket:
                raise UsageError("-p SOCKET is required")
            if not SOCKET_RE.match(args.socket):
                raise UsageError(f"-p {args.socket}: not unix:/path, local:/path, inet:PORT@HOST "
                                 "or inet6:PORT@HOST")
    except UsageError as exc:
        sys.stderr.write(f"scam-back: {exc}\n{USAGE}")
        return daemon.EX_USAGE
    if args.help or args.version:
        sys.stdout.write(f"{USAGE}\n{_features(args.config)}\n")
        return daemon.EX_OK
    logmod.setup("info", stderr=True)
    try:
        config, router = load_all(args.config)
    except configmod.ConfigError as exc:
        log.error("%s", exc)
        return daemon.EX_CONFIG
    logmod.set_level(config.log_level)
    if args.check:
        try:
            daemon.read_secrets(config)     # serving reads them itself, as root, once
            placement.chosen_cpu(config)
        except configmod.ConfigError as exc:
            log.error("%s", exc)
            return daemon.EX_CONFIG
        log.info("%s: OK, %s", args.config, router.summary())
        return daemon.EX_OK
    options = daemon.Options(args.socket, args.config, args.user, args.group, args.cache_file,
                             args.pid_file, args.detach, int(args.timeout or 0))
    try:
        return daemon.serve(options, config, router)
    except daemon.StartupError as exc:
        log.error("%s", exc)
        return exc.code
