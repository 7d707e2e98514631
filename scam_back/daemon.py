"""Run the milter: detach, drop privileges, pid file, cache load/save, periodic saves, libmilter."""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import grp
import importlib
import logging
import os
import pwd
import resource
import signal
from dataclasses import dataclass
from typing import Optional

import Milter
import milter as libmilter

from . import cache as cachemod
from . import cachefile
from . import catchall
from . import control
from . import log as logmod
from . import placement
from . import sharedcache
from .admin import Admin
from .backend import TLSContexts, tls_contexts_for
from . import config as configmod
from .config import Config, ConfigError
from .milter import ScamBackMilter
from .pool import SessionPool
from .housekeeping import Housekeeper
from .reload import Reloader
from .routing import Router
from .stats import Stats
from .threads import STOP_SIGNALS
from .verifier import Verifier

log = logging.getLogger("scam-back")

EX_OK, EX_USAGE, EX_NOUSER, EX_SOFTWARE, EX_OSERR, EX_CANTCREAT, EX_NOPERM, EX_CONFIG = \
    0, 64, 67, 70, 71, 73, 77, 78
# Modules some libraries import lazily: load them while the code is still readable by root.
WARM_IMPORTS = ("dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA", "dns.rdtypes.ANY.MX",
                "dns.rdtypes.ANY.CNAME", "dns.rdtypes.ANY.SOA", "dns.rdtypes.ANY.NS",
                "encodings.idna", "encodings.ascii", "encodings.utf_8", "encodings.latin_1")


class StartupError(Exception):
    """A reason not to start, with the sysexits code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Options:
    """What the command line chose."""

    socket: str
    config_path: str
    user: Optional[str] = None
    group: Optional[str] = None
    cache_file: Optional[str] = None
    pid_file: str = "/var/spool/scam/scam-back.pid"
    detach: bool = False
    milter_timeout: int = 0


def lookup_ids(user: Optional[str], group: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """-u/-g -> (uid, gid); an unknown name is a StartupError (EX_NOUSER)."""
    uid = gid = None
    if user:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise StartupError(f"-u {user}: no such user", EX_NOUSER) from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"-g {group}: no such group", EX_NOUSER) from None
    return uid, gid


def drop_privileges(user: Optional[str], uid: Optional[int], gid: Optional[int]) -> None:
    """Become the -u user with exactly its groups; refuse to go on as root."""
    try:
        if os.geteuid() == 0 and uid is not None and user:
            os.initgroups(user, gid if gid is not None else pwd.getpwnam(user).pw_gid)
            if gid is not None:
                os.setgid(gid)
            os.setuid(uid)
        elif uid is not None and uid != os.getuid():
            raise StartupError(f"-u {user}: only root can switch to another user", EX_NOPERM)
        elif gid is not None and gid != os.getegid():
            os.setgid(gid)
    except PermissionError as exc:
        raise StartupError(f"cannot switch user or group: {exc.strerror}", EX_NOPERM) from None
    if os.getuid() == 0 or os.geteuid() == 0:
        raise StartupError("refusing to run as root: start it with -u USER, an unprivileged user "
                           "that can write the socket, pid and cache directories", EX_NOPERM)


def detach() -> None:
    """Fork into the background: new session, cwd /, stdio on /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def check_pidfile(path: str) -> None:
    """Refuse to start if the pid file names another live scam-back (a second instance)."""
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return
    if not text.isdigit() or int(text) in (0, os.getpid()):
        return
    old = int(text)
    try:
        os.kill(old, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    try:
        with open(f"/proc/{old}/cmdline", "rb") as handle:
            if b"scam" not in handle.read():
                return          # a stale file whose pid now belongs to something else
    except OSError:
        pass
    raise StartupError(f"pid file {path} names running process {old}: another scam-back uses it "
                       "(give each instance its own -P)", EX_CANTCREAT)


def write_pidfile(path: str) -> None:
    """Write our pid (mode 0600) through a new file renamed into place: a symlink planted at
    the path is replaced, never followed."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StartupError(f"cannot write pid file {path}: {exc.strerror} (make its directory "
                           "writable by the -u user, or give another with -P)", EX_CANTCREAT) from None


def raise_fd_limit() -> None:
    """Use the hard limit on open files: each MTA connection can hold a backend socket too."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit: %s", exc)


def make_run_dir(path: str, uid: Optional[int], gid: Optional[int]) -> None:
    """As root, create a missing pid-file directory (not its parents) for the -u user."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.geteuid() != 0 or uid is None or os.path.isdir(directory):
        return
    try:
        os.mkdir(directory, 0o755)
        os.chown(directory, uid, gid if gid is not None else -1)
        log.info("created %s for the pid file", directory)
    except OSError as exc:
        log.warning("cannot create %s: %s", directory, exc.strerror)


def check_socket(spec: str) -> None:
    """A unix socket's directory must exist and be writable now (after the privilege drop)."""
    kind, _, rest = spec.partition(":")
    path = rest if kind in ("unix", "local") else (spec if not rest else "")
    if path:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StartupError(f"socket directory {directory} is not writable by this user "
                               "(libmilter creates the socket after the privilege drop)", EX_CANTCREAT)


def open_socket(spec: str, timeout: int) -> None:
    """Open the milter socket now, so that a bad one stops start-up before -D detaches.

    runmilter later finds it open and uses it.
    """
    try:
        libmilter.setconn(spec)
        if timeout > 0:
            libmilter.settimeout(timeout)
        libmilter.register("scam-back")
        libmilter.opensocket(True)
    except libmilter.error as exc:
        raise StartupError(f"cannot open milter socket {spec}: {exc}", EX_OSERR) from None


def warm_imports() -> None:
    """Import lazily loaded modules before the privilege drop may make them unreadable."""
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def read_secrets(config: Config) -> tuple[Optional[str], TLSContexts]:
    """The Redis password and the BackTLS contexts (BackTLSCAFile): files often readable by
    root only, so read before the privilege drop; ConfigError naming the line if they fail."""
    return sharedcache.read_password(config), tls_contexts_for(config)


def load_cache(cache: cachemod.VerdictCache, path: Optional[str]) -> None:
    """Load the cache file with the garbage collector off, then exempt what was loaded from it.

    A million entries are long-lived and hold no reference cycles: walking them again in every
    full collection would only stall decisions (and slow the load itself).
    """
    gc.disable()
    try:
        cachefile.load_file(cache, path)
    finally:
        gc.enable()
    gc.collect()
    gc.freeze()


def absolute_paths(options: Options, config: Config, start_dir: str) -> tuple[Options, Config]:
    """Files named relative to the start directory, made absolute: -D moves to / before the
    pid file is written, and reloads, saves and the control socket come later still."""
    def absolute(path: Optional[str]) -> Optional[str]:
        return os.path.join(start_dir, path) if path else path
    options = dataclasses.replace(options, pid_file=absolute(options.pid_file),
                                  cache_file=absolute(options.cache_file))
    return options, configmod.absolute_paths(config, start_dir)


def start_exposition(config: Config, admin: Admin):  # type: ignore[no-untyped-def]
    """The Prometheus endpoint on StatsListen; a port that cannot be bound stops start-up."""
    from . import metrics       # prometheus_client is loaded only when asked for
    assert config.stats_listen is not None
    host, port = config.stats_listen
    try:
        server = metrics.serve(host, port, admin.snapshot)
    except OSError as exc:
        raise StartupError(f"{config.where('stats_listen')}: StatsListen {host}:{port}: cannot "
                           f"listen: {exc.strerror} (pick a free port)", EX_OSERR) from None
    log.info("statistics for Prometheus on http://%s:%d/metrics",
             f"[{host}]" if ":" in host else host, port)
    return server


def run_milter(socket_spec: str, timeout: int, end_of_message: bool) -> None:
    """Milter.runmilter, with no Python call at end of message or abort unless BitBucket needs
    them (its list of invalid recipients): libmilter then answers them itself, without taking
    the GIL (a hand-off per message saved)."""
    setters = {name: getattr(libmilter, name) for name in ("set_eom_callback", "set_abort_callback")}
    if not end_of_message:
        for name, setter in setters.items():
            setattr(libmilter, name, lambda callback, setter=setter: setter(None))
    try:
        Milter.runmilter("scam-back", socket_spec, timeout)
    finally:
        for name, setter in setters.items():
            setattr(libmilter, name, setter)


def serve(options: Options, config: Config, router: Router) -> int:
    """Everything after the config is known good; returns the exit code."""
    # A stop signal that arrives before libmilter's signal thread runs would kill the process
    # before it saved anything or removed its pid file: keep the signals pending until then.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    start_dir = os.getcwd()
    options, config = absolute_paths(options, config, start_dir)
    uid, gid = lookup_ids(options.user, options.group)
    if os.geteuid() == 0 and uid in (None, 0):
        raise StartupError("refusing to run as root: start it with -u USER, an unprivileged user "
                           "that can write the socket, pid and cache directories", EX_NOPERM)
    warm_imports()
    if config.bitbucket:
        log.warning("BitBucket is on: invalid recipients are accepted and silently removed; "
                    "senders get no bounce for them")
    try:
        password, tls = read_secrets(config)
        cpu = placement.chosen_cpu(config)
    except ConfigError as exc:
        raise StartupError(str(exc), EX_CONFIG) from None
    make_run_dir(options.pid_file, uid, gid)
    drop_privileges(options.user, uid, gid)
    os.umask(0o117)         # socket 0660 for the user's (or -g) group; files are made 0600
    raise_fd_limit()
    check_socket(options.socket)
    check_pidfile(options.pid_file)
    if options.detach and not os.access(os.path.dirname(os.path.abspath(options.pid_file)), os.W_OK):
        raise StartupError(f"cannot write pid file {options.pid_file}: its directory is not writable "
                           "by this user (give another with -P)", EX_CANTCREAT)
    open_socket(options.socket, options.milter_timeout)
    stats = Stats()
    shared = None
    if config.shared_cache:       # no connection yet: a URL redis refuses stops start-up here
        try:
            shared = sharedcache.SharedCache(config.shared_cache, config.cache_timeout, stats,
                                             password, config.shared_cache_shown)
        except ValueError:
            raise StartupError(f"{config.where('shared_cache')}: BackCache "
                               f"{config.shared_cache_shown}: redis cannot use this URL",
                               EX_CONFIG) from None
    control_path = control.socket_path(config.control_socket, options.pid_file)
    controller: Optional[control.ControlServer] = None
    try:
        controller = control.ControlServer(control_path, lambda request: admin.handle(request))
    except control.ControlError as exc:
        # A ControlSocket the admin chose must work; the default one beside a pid file that
        # cannot be written either (foreground only) is worth a warning.
        if config.control_socket or options.detach:
            where = f"{config.where('control_socket')}: " if config.control_socket else ""
            raise StartupError(f"{where}{exc}", EX_CANTCREAT) from None
        log.warning("%s; serving without admin commands", exc)
    if options.detach:
        detach()
        logmod.setup(config.log_level, stderr=False)
    pid_file: Optional[str] = options.pid_file
    try:
        write_pidfile(options.pid_file)
    except StartupError as exc:
        # rc scripts and systemd need the pid file of a detached daemon; in the foreground the
        # process is supervised directly, so a pid file it cannot write is worth a warning only.
        if options.detach:
            if controller is not None:
                controller.stop()
            raise
        log.warning("%s; serving without a pid file", exc)
        pid_file = None
    cache_path = config.backlist or options.cache_file
    cache = cachemod.VerdictCache(config.valid_ttl, config.invalid_ttl, config.cache_max,
                                  invalid_max=config.invalid_cache_max,
                                  stale_grace=config.stale_grace)
    pool = SessionPool(config.idle_timeout, config.max_probes)
    verifier = Verifier(config, router, cache, pool=pool, stats=stats, shared=shared,
                        secret=catchall.load_secret(cache_path), tls_contexts=tls)
    reloader = Reloader(config, verifier, start_dir)
    admin = Admin(verifier, shared, reloader.reload)
    keeper = Housekeeper(cache, cache_path, config.save_interval, pool, reloader, admin,
                         config.stats_interval)
    exposition = None
    logmod.enable_fast_verdicts()
    try:
        load_cache(cache, cache_path)
        if shared is not None:
            shared.listen(admin.flush_local)
            if shared.ping():
                log.info("shared cache %s: connected", config.shared_cache_shown)
        if controller is not None:
            controller.start()
        if config.stats_listen:
            exposition = start_exposition(config, admin)
        Milter.factory = functools.partial(ScamBackMilter, verifier)
        Milter.set_flags(Milter.DELRCPT if config.bitbucket else 0)
        keeper.start()
        log.info("scam-back starting on %s as uid %d (config %s, cache %s, control %s, %s)",
                 options.socket, os.getuid(), config.path, cache_path or "none", control_path,
                 placement.serve_on(cpu))
        if config.dry_run:
            log.warning("BackDryRun is on: verdicts are logged and counted, nothing is rejected "
                        "or tempfailed")
        try:
            run_milter(options.socket, options.milter_timeout, end_of_message=config.bitbucket)
        except Milter.error as exc:
            log.error("libmilter failed on socket %s: %s", options.socket, exc)
            return EX_OSERR
        return EX_OK
    finally:
        verifier.refresher.stop()
        keeper.stop()
        if controller is not None:
            controller.stop()
        if exposition is not None:
            exposition.shutdown()
        cachefile.save_file(cache, cache_path)
        pool.close()
        if shared is not None:
            shared.close()
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove pid file %s: %s", pid_file, exc.strerror)
        log.info("Exit")
        logmod.disable_fast_verdicts()
