"""A private, real sendmail 8.17 for end-to-end tests (Debian's packages unpacked, never installed).

Installing Debian's sendmail packages would remove Postfix (both provide mail-transport-agent), so
the test machine keeps an unpacked copy instead. The Makefile fetches it; this module never
downloads anything:

    mkdir -p /var/cache/scam-back-test/sendmail
    cd /var/cache/scam-back-test/sendmail && apt-get download sendmail-bin sendmail-base sendmail-cf
    for deb in /var/cache/scam-back-test/sendmail/*.deb; do
        dpkg-deb -x "$deb" /var/cache/scam-back-test/sendmail/root; done
    apt-get install -y --no-install-recommends m4 libwrap0

`prepare_sendmail()` finds that tree (or unpacks the .debs itself when only they are there), and
`SendmailInstance` builds a .cf with m4 from its own .mc and runs `sendmail -bD` on two loopback
ports (Name=MTA and Name=MSA) with scam-back as its milter on a unix socket, relaying the test
domain to a Backend on 127.0.0.1. sendmail wants a fully qualified host name and asks DNS (after
sleeping 60 s) otherwise; it runs in its own UTS and mount namespace (`unshare -u -m`) with a test
host name and a private /etc/hosts, /etc/nsswitch.conf and /etc/resolv.conf bind-mounted there, so
it never waits on or queries a name server.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .procs import pid_alive

ENV_ROOT = "SCAM_BACK_SENDMAIL_ROOT"     # an unpacked tree (the folder holding usr/)
ENV_CACHE = "SCAM_BACK_SENDMAIL_CACHE"   # where the .debs are and root/ gets unpacked
DEFAULT_CACHE = "/var/cache/scam-back-test/sendmail"
PACKAGES = ("sendmail-bin", "sendmail-base", "sendmail-cf")
SENDMAIL_BIN = "usr/libexec/sendmail/sendmail"
CF_M4 = "usr/share/sendmail/cf/m4/cf.m4"
HOSTNAME = "smh.test.example"
DOMAIN = "example.net"

FETCH_HINT = (
    "mkdir -p {cache} && cd {cache} && apt-get download sendmail-bin sendmail-base sendmail-cf && "
    "for d in {cache}/*.deb; do dpkg-deb -x $d {cache}/root; done && "
    "apt-get install -y --no-install-recommends m4 libwrap0")

# Runs as `unshare -u -m --propagation private sh -c NAMESPACE_SCRIPT sh DIR PROGRAM ARGS...`:
# the bind mounts and the host name exist only inside the new namespaces, and `exec` makes
# the shell's pid the program's pid.
NAMESPACE_SCRIPT = """set -e
dir=$1; shift
hostname "$(cat "$dir/hostname")"
mount --bind "$dir/hosts" /etc/hosts
mount --bind "$dir/nsswitch.conf" /etc/nsswitch.conf
mount --bind "$dir/resolv.conf" /etc/resolv.conf
exec "$@"
"""


def default_cache_dir() -> str:
    return os.environ.get(ENV_CACHE) or DEFAULT_CACHE


def _complete(root: str) -> bool:
    return (os.access(os.path.join(root, SENDMAIL_BIN), os.X_OK)
            and os.path.isfile(os.path.join(root, CF_M4)))


def _debs(folder: str) -> dict[str, str]:
    """The newest .deb of each sendmail package in folder, by package name."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        matches = sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))
        if matches:
            found[package] = matches[-1]
    return found


def prepare_sendmail(cache_dir: Optional[str] = None) -> tuple[Optional[str], str]:
    """Return (root of an unpacked sendmail tree, "") or (None, why not).

    Order: $SCAM_BACK_SENDMAIL_ROOT if set; else CACHE/root if complete; else the three .debs in
    CACHE are unpacked (dpkg-deb -x) into CACHE/root. CACHE is cache_dir, else
    $SCAM_BACK_SENDMAIL_CACHE, else /var/cache/scam-back-test/sendmail. Never downloads anything.
    """
    explicit = os.environ.get(ENV_ROOT)
    if explicit:
        if _complete(explicit):
            return explicit, ""
        return None, f"{ENV_ROOT}={explicit} holds no {SENDMAIL_BIN} and {CF_M4}"
    cache = cache_dir or default_cache_dir()
    root = os.path.join(cache, "root")
    if _complete(root):
        return root, ""
    debs = _debs(cache)
    missing = [p for p in PACKAGES if p not in debs]
    if missing:
        return None, (f"no unpacked sendmail in {root} and no .deb for {', '.join(missing)} in "
                      f"{cache}; fetch it with: {FETCH_HINT.format(cache=cache)}")
    if shutil.which("dpkg-deb") is None:
        return None, f"the .debs are in {cache} but dpkg-deb is not installed"
    staging = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for deb in debs.values():
            subprocess.run(["dpkg-deb", "-x", deb, staging], check=True, capture_output=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        if not _complete(staging):
            return None, f"unpacking {', '.join(debs.values())} gave no {SENDMAIL_BIN}"
        try:
            os.rename(staging, root)      # atomic; a concurrent run may have won the race
        except OSError:
            if not _complete(root):
                raise
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", b"") or b"").decode(errors="replace")
        return None, f"cannot unpack the sendmail .debs in {cache}: {err} {detail}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root, ""


def _write_namespace_files(folder: str, hostname: str = HOSTNAME) -> None:
    """hosts, nsswitch.conf, resolv.conf and the host name for the private namespace."""
    short = hostname.split(".")[0]
    files = {
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\t{hostname} {short} localhost\n::1\tlocalhost ip6-localhost\n",
        "nsswitch.conf": "hosts: files\npasswd: files\ngroup: files\n",
        # Never the machine's name server: a loopback address that refuses at once.
        "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as handle:
            handle.write(text)


def namespace_command(folder: str, *program: str) -> list[str]:
    """Run program in private UTS and mount namespaces set up from folder's files."""
    return ["unshare", "-u", "-m", "--propagation", "private",
            "sh", "-c", NAMESPACE_SCRIPT, "sh", folder, *program]


@functools.lru_cache(maxsize=None)
def sendmail_available() -> tuple[bool, str]:
    """(True, "") when a real sendmail with milter support can run here, else (False, why)."""
    if not sys.platform.startswith("linux"):
        return False, "the sendmail end-to-end tests need Linux namespaces"
    if os.geteuid() != 0:
        return False, "the sendmail end-to-end tests need root (unshare -u -m, sendmail -bD)"
    for tool in ("unshare", "mount", "hostname", "m4"):
        if shutil.which(tool) is None:
            hint = " (apt-get install m4)" if tool == "m4" else ""
            return False, f"{tool} is not installed{hint}"
    root, reason = prepare_sendmail()
    if root is None:
        return False, reason
    folder = tempfile.mkdtemp(prefix="scam-back-sendmail-check-")
    try:
        _write_namespace_files(folder)
        # Prints the version and compile options, then stops at the missing config.
        proc = subprocess.run(namespace_command(folder, os.path.join(root, SENDMAIL_BIN),
                                                "-d0.1", "-bt", "-C", "/dev/null"),
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"cannot run {root}/{SENDMAIL_BIN} in a namespace: {err}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    output = proc.stdout + proc.stderr
    if "Version 8." not in output:
        if "error while loading shared libraries" in output:
            return False, (f"sendmail misses a shared library (apt-get install libwrap0?): "
                           f"{output.strip()}")
        return False, f"sendmail in `unshare -u -m` did not run: {output.strip()[:500]}"
    if not re.search(r"\bMILTER\b", output):
        return False, "this sendmail is built without MILTER"
    return True, ""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SendmailInstance:
    """sendmail -bD on 127.0.0.1 (an MTA and an MSA port), scam-back as milter, relaying DOMAIN
    to a backend on 127.0.0.1:backend_port. Everything lives in a root-owned temporary folder."""

    def __init__(self, root: str, milter_socket: str, backend_port: int, *,
                 domain: str = DOMAIN, hostname: str = HOSTNAME, milter_flags: str = "T") -> None:
        self.root = root
        self.milter_socket = milter_socket
        self.backend_port = backend_port
        self.domain = domain
        self.hostname = hostname
        self.milter_flags = milter_flags
        self.dir = tempfile.mkdtemp(prefix="scam-back-sendmail-")   # root, 0700
        self.queue = os.path.join(self.dir, "queue")
        self.mc = os.path.join(self.dir, "sendmail.mc")
        self.cf = os.path.join(self.dir, "sendmail.cf")
        self.pidfile = os.path.join(self.dir, "sendmail.pid")
        self.logpath = os.path.join(self.dir, "output.log")
        self.trafficlog = os.path.join(self.dir, "traffic.log")
        self.port = 0
        self.msa_port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None

    @property
    def sendmail(self) -> str:
        return os.path.join(self.root, SENDMAIL_BIN)

    def mc_text(self) -> str:
        d = self.dir
        socket_dir = os.path.dirname(os.path.abspath(self.milter_socket))
        sticky = socket_dir == "/tmp" or socket_dir.startswith("/tmp/") or d.startswith("/tmp/")
        lines = [
            "divert(-1)",
            "# scam-back end-to-end test: a private sendmail, see tests/sendmail.py",
            "divert(0)dnl",
            f"include(`{os.path.join(self.root, CF_M4)}')dnl",
            "VERSIONID(`scam-back e2e test')dnl",
            "OSTYPE(`linux')dnl",
            *(["define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl"] if sticky else []),
            f"define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl",
            f"define(`confPID_FILE', `{d}/sendmail.pid')dnl",
            f"define(`QUEUE_DIR', `{self.queue}')dnl",
            f"define(`STATUS_FILE', `{d}/statistics')dnl",
            f"define(`ALIAS_FILE', `{d}/aliases')dnl",
            f"define(`confHELP_FILE', `{d}/helpfile')dnl",
            f"define(`confCW_FILE', `{d}/local-host-names')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            "define(`confTO_IDENT', `0')dnl",
            # A busy test machine must not make sendmail queue instead of deliver, or refuse.
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            "define(`confDELAY_LA', `0')dnl",
            "define(`confBAD_RCPT_THROTTLE', `0')dnl",
            # Every non-local domain (only DOMAIN is allowed to relay) goes to the backend.
            "define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl",
            f"define(`ESMTP_MAILER_ARGS', `TCP $h {self.backend_port}')dnl",
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",   # senders need no DNS either
            f"RELAY_DOMAIN(`{self.domain}')dnl",
            f"DAEMON_OPTIONS(`Port={self.port}, Addr=127.0.0.1, Name=MTA')dnl",
            f"DAEMON_OPTIONS(`Port={self.msa_port}, Addr=127.0.0.1, Name=MSA, M=E')dnl",
            # The INPUT_MAIL_FILTER and macro lines of INSTALL, with this test's socket.
            f"INPUT_MAIL_FILTER(`scam-back', `S=unix:{self.milter_socket}, "
            f"F={self.milter_flags}, T=S:240s;R:240s;E:5m')dnl",
            "define(`confMILTER_MACROS_CONNECT', confMILTER_MACROS_CONNECT`, {daemon_name}')dnl",
            "define(`confMILTER_MACROS_ENVFROM', confMILTER_MACROS_ENVFROM`, i, {auth_authen}')dnl",
            "define(`confMILTER_MACROS_ENVRCPT', confMILTER_MACROS_ENVRCPT`, {rcpt_addr}, i')dnl",
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
        ]
        return "\n".join(lines) + "\n"

    def build(self) -> None:
        """Pick ports, write the .mc and the files it names, and m4 it into a .cf."""
        self.port = free_port()
        self.msa_port = free_port()
        while self.msa_port == self.port:
            self.msa_port = free_port()
        os.makedirs(self.queue, mode=0o700, exist_ok=True)
        _write_namespace_files(self.dir, self.hostname)
        for name, text in {"service.switch": "hosts files\naliases files\n", "aliases": "",
                           "helpfile": "", "statistics": "",
                           "local-host-names": f"{self.hostname}\n"}.items():
            with open(os.path.join(self.dir, name), "w") as handle:
                handle.write(text)
        Path(self.mc).write_text(self.mc_text())
        proc = subprocess.run(["m4", self.mc], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or "Milter.macros.envrcpt" not in proc.stdout:
            raise RuntimeError(f"m4 {self.mc} failed ({proc.returncode}): {proc.stderr}")
        Path(self.cf).write_text(proc.stdout)
        os.chmod(self.cf, 0o644)

    def command(self) -> list[str]:
        return namespace_command(self.dir, self.sendmail, "-C", self.cf, "-bD",
                                 "-X", self.trafficlog)

    def start(self, timeout: float = 20.0, attempts: int = 3) -> "SendmailInstance":
        """Start sendmail -bD; return once both ports answer with a 220 greeting.

        A port taken between free_port() and sendmail's bind (sendmail then retries the bind
        for ever) means a new pair of ports and another try.
        """
        if self.proc is not None:
            raise RuntimeError("sendmail already started")
        for attempt in range(1, attempts + 1):
            self.build()
            log = open(self.logpath, "wb")
            try:
                # Own session and process group: the per-connection and delivery children
                # that sendmail forks stay in it, so stop() can reap what SIGTERM left behind.
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log, start_new_session=True)
            finally:
                log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code is not None:
                    output = self.log()
                    self.stop()
                    raise RuntimeError(f"sendmail exited {code}: {output}")
                pid = self._pid_from_file()
                if pid is not None and self._greets(self.port) and self._greets(self.msa_port):
                    self.pid = pid
                    return self
                if "cannot bind" in self._output():
                    break
                time.sleep(0.05)
            output = self.log()
            self.stop(timeout=3)
            if "cannot bind" not in output or attempt == attempts:
                raise RuntimeError(f"sendmail did not listen on 127.0.0.1:{self.port} and "
                                   f":{self.msa_port} within {timeout} s: {output}")
        raise AssertionError("unreachable")

    def _output(self) -> str:
        try:
            return Path(self.logpath).read_text(errors="replace")
        except OSError:
            return ""

    def _pid_from_file(self) -> Optional[int]:
        try:
            return int(Path(self.pidfile).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _greets(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                ok = sock.recv(512).startswith(b"220 ")
                sock.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def log(self) -> str:
        parts = []
        for path in (self.logpath, self.trafficlog):
            try:
                text = Path(path).read_text(errors="replace")[-4000:]
            except OSError:
                continue
            if text:
                parts.append(f"--- {os.path.basename(path)}\n{text}")
        return "\n".join(parts)

    def traffic(self) -> str:
        """sendmail's -X log: every SMTP line it read and wrote, inbound and outbound."""
        try:
            return Path(self.trafficlog).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the daemon by pid, wait, then SIGKILL what is left of its process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pids = {proc.pid}
        for pid in (self.pid, self._pid_from_file()):
            if pid is not None:
                pids.add(pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
            proc.poll()
            time.sleep(0.05)
        for pid in pids:        # a daemon that ignored SIGTERM
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:                    # children that outlived it (proc.pid leads the group)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.pid = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SendmailInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
