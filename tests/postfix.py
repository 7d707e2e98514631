"""A private Postfix instance for end-to-end tests (Debian's postfix package, run as root).

Everything lives under one root-owned temporary directory: etc/ (main.cf, master.cf), spool/
(queue_directory, with master.pid in spool/pid), data/ (data_directory, owned by postfix) and
log/maillog (maillog_file through the postlog service: there is no syslog on these machines).
Every master.cf line has chroot n, smtpd listens on 127.0.0.1 only, mail for the relay domains
goes to the test backend and everything else to error:, so no mail ever leaves the machine.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

from .procs import pid_alive

POSTFIX = "/usr/sbin/postfix"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Services a relay-only instance needs; chroot (5th column) n everywhere, so nothing has to be
# copied into the queue directory.
MASTER_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def postfix_available() -> tuple[bool, str]:
    """(True, "") when a private Postfix can run here, else (False, why not)."""
    if os.geteuid() != 0:
        return False, ("the Postfix end-to-end tests need root (postfix -c DIR start); "
                       "CI runs as root")
    if not os.access(POSTFIX, os.X_OK):
        return False, (f"{POSTFIX} not found: install Debian's postfix package (see the Makefile: "
                       "preseeded 'No configuration', service starts blocked)")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return False, "no 'postfix' user: the postfix package is not installed properly"
    return True, ""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (bound together, then closed)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on 127.0.0.1 (from /proc/net/tcp)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, _, port = fields[1].partition(":")
        if fields[3] == "0A" and address in ("0100007F", "00000000"):
            ports.add(int(port, 16))
    return ports


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


class PostfixInstance:
    """A private Postfix: relay for `domains` to 127.0.0.1:backend_port through `milter`.

    port: the MTA listener (smtpd_milters = milter). submission_port: a second smtpd with
    `-o milter_macro_daemon_name=MSA`. listeners: more smtpd listeners, name -> {param: value}
    given as `-o param=value` (e.g. a different smtpd_milters or milter_default_action); their
    ports are in self.ports[name]. main_extra: more main.cf settings (e.g. transport_maps), which
    override the defaults below.
    """

    def __init__(self, milter: str, backend_port: int, domains: Iterable[str] = ("example.net",),
                 milter_default_action: str = "tempfail",
                 main_extra: Optional[Mapping[str, str]] = None,
                 listeners: Optional[Mapping[str, Mapping[str, str]]] = None,
                 hostname: str = "mx.test.example", parent: Optional[str] = None) -> None:
        self.milter = milter
        self.backend_port = backend_port
        self.domains = tuple(domains)
        self.milter_default_action = milter_default_action
        self.main_extra = dict(main_extra or {})
        self.listener_options = {name: dict(opts) for name, opts in (listeners or {}).items()}
        self.hostname = hostname
        self.dir = tempfile.mkdtemp(prefix="scam-back-postfix-", dir=parent)   # root, 0700
        os.chmod(self.dir, 0o755)       # smtpd (user postfix) must reach its queue under it
        self.etc = os.path.join(self.dir, "etc")
        self.queue = os.path.join(self.dir, "spool")
        self.data = os.path.join(self.dir, "data")
        self.logdir = os.path.join(self.dir, "log")
        self.logfile = os.path.join(self.logdir, "maillog")
        names = ["submission", *self.listener_options]
        ports = free_ports(1 + len(names))
        self.port = ports[0]
        self.ports = dict(zip(names, ports[1:]))
        self.submission_port = self.ports["submission"]
        self.pid: Optional[int] = None

    # ---- configuration ----

    def main_settings(self) -> dict[str, str]:
        relay_domains = ", ".join(self.domains)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "maillog_file": self.logfile,
            "maillog_file_prefixes": self.dir,
            "myhostname": self.hostname,
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": relay_domains,
            "relay_transport": f"relay:[127.0.0.1]:{self.backend_port}",
            "default_transport": "error:mail for other domains is not delivered in tests",
            "local_transport": "error:no local delivery in tests",
            "alias_maps": "",
            "alias_database": "",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_milters": self.milter,
            "milter_default_action": self.milter_default_action,
            "milter_protocol": "6",
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "15s",
            # Fast queue: deliver at once, retry deferred mail within seconds.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connection_cache_on_demand": "no",
            # No throttling of the test client (rejected RCPTs count as errors).
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
            "in_flow_delay": "0",
            "biff": "no",
        }
        settings.update(self.main_extra)
        return settings

    def master_cf(self) -> str:
        lines = [f"127.0.0.1:{self.port} inet n - n - - smtpd",
                 f"127.0.0.1:{self.submission_port} inet n - n - - smtpd",
                 "  -o syslog_name=postfix/submission",
                 "  -o milter_macro_daemon_name=MSA"]
        for name, options in self.listener_options.items():
            lines.append(f"127.0.0.1:{self.ports[name]} inet n - n - - smtpd")
            lines.append(f"  -o syslog_name=postfix/{name}")
            for key, value in options.items():
                if any(c.isspace() for c in value) or "," in value:
                    raise ValueError(f"listener {name}: -o {key}={value!r} needs no spaces/commas")
                lines.append(f"  -o {key}={value}")
        return "\n".join(lines) + "\n" + MASTER_SERVICES

    def write_config(self) -> None:
        postfix = pwd.getpwnam("postfix")
        for path in (self.etc, self.queue, self.logdir):
            os.makedirs(path, 0o755, exist_ok=True)
            os.chmod(path, 0o755)
        os.makedirs(self.data, 0o700, exist_ok=True)
        os.chown(self.data, postfix.pw_uid, postfix.pw_gid)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_settings().items())
        Path(self.etc, "main.cf").write_text(main)
        Path(self.etc, "master.cf").write_text(self.master_cf())

    # ---- running ----

    def postfix(self, *args: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", self.etc, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def start(self) -> "PostfixInstance":
        """Write the config, `postfix -c DIR start`, wait until every listener answers."""
        self.write_config()
        result = self.postfix("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed ({result.returncode}): {result.stdout}"
                               f"{result.stderr}\n{self.maillog()}")
        deadline = time.monotonic() + START_TIMEOUT
        pidfile = Path(self.queue, "pid", "master.pid")
        while self.pid is None and time.monotonic() < deadline:
            try:
                self.pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        if self.pid is None:
            self.stop()
            raise RuntimeError(f"no master.pid after postfix start: {self.maillog()}")
        # `postfix start` returns once master listens; check without connecting, so that no
        # SMTP session (and no milter connection) is made that a test did not ask for.
        wanted = {self.port, *self.ports.values()}
        while not wanted <= listening_ports():
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"postfix does not listen on {sorted(wanted)}: {self.maillog()}")
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def stop(self) -> None:
        """SIGTERM to master by pid, a bounded wait, then SIGKILL to what is left of its group."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            pgid = pid          # master calls setsid(): its group id is its pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        if pgid > 1 and pgid != os.getpgrp():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and (pid_alive(pid) or _group_members(pgid)):
            time.sleep(0.05)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def maillog(self) -> str:
        """The instance's log so far ("" before the first line)."""
        try:
            return Path(self.logfile).read_text(errors="replace")
        except OSError:
            return ""

    def wait_maillog(self, *parts: str, timeout: float = 10.0) -> bool:
        """Wait (bounded) for a log line containing every part; postlogd writes it a moment
        after the fact."""
        deadline = time.monotonic() + timeout
        while not any(all(part in line for part in parts) for line in self.maillog().splitlines()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def tool(self, name: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        """Run a Postfix command (postsuper, postqueue, postconf...) on this instance."""
        return subprocess.run([f"/usr/sbin/{name}", "-c", self.etc, *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def mailq(self) -> str:
        """The queue listing (postqueue -p), for failure messages."""
        try:
            return self.tool("postqueue", "-p").stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"(postqueue failed: {exc})"

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
