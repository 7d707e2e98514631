"""Reloader: re-read scam.conf and its tables on `reload` or when they change on disk; a bad new
config is refused with its reason and the running one keeps serving."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Optional

from . import log as logmod
from . import routing
from .config import Config, ConfigError
from .verifier import Verifier

log = logging.getLogger("scam-back")

# Settings read once at start-up: a reload that changes them says they wait for a restart.
RESTART_ONLY = {"shared_cache": "BackCache", "cache_password_file": "BackCachePasswordFile",
                "cache_timeout": "BackCacheTimeout", "control_socket": "ControlSocket",
                "stats_listen": "StatsListen", "cache_max": "BackCacheMax",
                "invalid_cache_max": "BackInvalidCacheMax", "backlist": "BackList",
                "bitbucket": "BitBucket", "save_interval": "BackListSaveInterval",
                "stats_interval": "StatsInterval", "tls": "BackTLS", "tls_ca_file": "BackTLSCAFile",
                "cpu_affinity": "CPUAffinity"}


class ReloadError(Exception):
    """The new config was refused; the message says where and why."""


def _signature(path: str) -> tuple:
    """What tells a file changed: mtime, size, inode (a file replaced by rename too)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class Reloader:
    """Owns the running config; swaps a new one into the verifier when it loads cleanly."""

    def __init__(self, config: Config, verifier: Verifier, base_dir: Optional[str] = None) -> None:
        self.config, self.verifier, self.base_dir = config, verifier, base_dir
        self._lock = threading.Lock()
        self._seen = self._signatures(config)   # files as last loaded, or last refused

    @staticmethod
    def _signatures(config: Config) -> dict:
        return {path: _signature(path) for path in routing.watched_files(config)}

    def reload(self, why: str = "asked by scam-back-ctl") -> list[str]:
        """Load and apply the config; ReloadError (the old config stays) if it is bad."""
        with self._lock:
            seen = self._signatures(self.config)
            try:
                config, router, warnings = routing.load(self.config.path, self.base_dir)
            except ConfigError as exc:
                self._seen = seen
                log.error("reload refused (%s): %s; still serving the previous config", why, exc)
                raise ReloadError(f"refused: {exc}; still serving the previous config") from None
            lines = [f"warning: {w}" for w in warnings]
            for fieldname, key in RESTART_ONLY.items():
                if getattr(config, fieldname) != getattr(self.config, fieldname):
                    lines.append(f"warning: {key} changed: it takes effect at the next restart")
            self._apply(config, router)
            # The files as they were before this load: one still being written meanwhile is
            # seen as changed at the next check, and read again whole.
            self._seen = seen if routing.watched_files(config) == list(seen) else \
                self._signatures(config)
            for line in lines:
                log.warning("reload: %s", line.removeprefix("warning: "))
            log.info("reloaded %s (%s): %s", config.path, why, router.summary())
            return lines + [f"reloaded {config.path}"]

    def _apply(self, config: Config, router: routing.Router) -> None:
        verifier = self.verifier
        cache = verifier.cache
        # Keep the start-up's restart-only settings in the running config.
        kept = {field: getattr(self.config, field) for field in RESTART_ONLY}
        config = dataclasses.replace(config, **kept)
        cache.set_ttls(config.valid_ttl, config.invalid_ttl, config.stale_grace)
        verifier.reconfigure(config, router)
        logmod.set_level(config.log_level)
        self.config = config

    def check(self) -> None:
        """Reload if a watched file changed since the last look (called every few seconds)."""
        current = self._signatures(self.config)
        if current == self._seen:
            return
        try:
            self.reload("changed on disk")
        except ReloadError:
            pass            # logged; tried again when the files change once more
