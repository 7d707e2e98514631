"""scam-back-ctl: ask a running scam-back over its control socket; main() -> exit code."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from . import config as configmod
from .control import ControlError, request, socket_path

EX_OK, EX_FAILED, EX_USAGE, EX_UNAVAILABLE = 0, 1, 64, 69
DEFAULT_PID_FILE = "/var/spool/scam/scam-back.pid"

USAGE = """\
usage: scam-back-ctl [-s SOCKET | -f CONFIG [-P PIDFILE]] COMMAND [ARGUMENTS]
  check ADDRESS [--live [--update]]   route, backends, cached verdicts; --live probes now
                                      (--update stores the live verdict in the cache)
  flush ADDRESS | @DOMAIN | --invalid | --all
  dump                                the cache, one entry per line (the cache file format)
  stats [--json]                      counters since start, backend and cache state
  reload                              re-read scam.conf and the mailertable
  -s SOCKET   the daemon's control socket
  -f CONFIG   find it from this config's ControlSocket (default /etc/mail/scam.conf)
  -P PIDFILE  or beside this pid file, as the daemon's -P (default /var/spool/scam/scam-back.pid)
  -t SECONDS  wait this long for the answer (default 60)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="scam-back-ctl", add_help=False, usage=USAGE)
    parser.add_argument("-s", dest="socket")
    parser.add_argument("-f", dest="config", default=configmod.DEFAULT_CONFIG_PATH)
    parser.add_argument("-P", dest="pid_file", default=DEFAULT_PID_FILE)
    parser.add_argument("-t", dest="timeout", type=float, default=60.0)
    parser.add_argument("-h", "--help", dest="help", action="store_true")
    parser.add_argument("command", nargs="?")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def configured_socket(path: str) -> Optional[str]:
    """ControlSocket from a config file, read leniently: a config being edited may not parse,
    and reload must still reach the daemon to say why."""
    found = None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                match = re.match(r"\s*controlsocket\s*:\s*(\S.*?)\s*$", line, re.IGNORECASE)
                if match:
                    found = match.group(1)      # the last one wins, as in the daemon
    except OSError:
        return None
    return found


def build_request(command: str, args: list[str]) -> dict:
    """The request for a command line; ValueError says what is wrong with it."""
    flags = {a for a in args if a.startswith("--")}
    words = [a for a in args if not a.startswith("--")]
    allowed = {"check": {"--live", "--update"}, "flush": {"--invalid", "--all"}, "dump": set(),
               "stats": {"--json"}, "reload": set()}
    if command not in allowed:
        raise ValueError(f"unknown command {command!r}")
    if flags - allowed[command]:
        raise ValueError(f"{command}: unknown option {sorted(flags - allowed[command])[0]}")
    if command == "check":
        if len(words) != 1:
            raise ValueError("check needs one ADDRESS")
        if "--update" in flags and "--live" not in flags:
            raise ValueError("check --update needs --live")
        return {"command": "check", "address": words[0], "live": "--live" in flags,
                "update": "--update" in flags}
    if command == "flush":
        targets = words + sorted(flags)
        if len(targets) != 1:
            raise ValueError("flush needs one of ADDRESS, @DOMAIN, --invalid, --all")
        target = targets[0]
        if target in ("--invalid", "--all"):
            return {"command": "flush", "what": target[2:]}
        if target.startswith("@"):
            return {"command": "flush", "what": "domain", "value": target[1:]}
        return {"command": "flush", "what": "address", "value": target}
    if words:
        raise ValueError(f"{command} takes no argument {words[0]!r}")
    return {"command": command, "json": "--json" in flags} if command == "stats" else \
        {"command": command}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Send one command; print the answer; 0 done, 1 refused, 64 usage, 69 daemon unreachable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        if args.help:
            sys.stdout.write(USAGE)
            return EX_OK
        if not args.command:
            raise ValueError("no command given")
        message = build_request(args.command, list(args.args))
    except ValueError as exc:
        sys.stderr.write(f"scam-back-ctl: {exc}\n{USAGE}")
        return EX_USAGE
    path = args.socket or socket_path(configured_socket(args.config), args.pid_file)
    try:
        answer = request(path, message, args.timeout)
        status = next(answer, "ERROR no answer")
        if status != "OK":
            sys.stderr.write(f"scam-back-ctl: {status.removeprefix('ERROR ')}\n")
            return EX_FAILED
        out = sys.stdout
        for line in answer:
            out.write(line + "\n")
        out.flush()
    except ControlError as exc:
        sys.stderr.write(f"scam-back-ctl: {exc}\n")
        return EX_UNAVAILABLE
    except BrokenPipeError:
        return EX_OK
    return EX_OK
