"""SharedCache: verdicts shared between scam-back daemons through Redis, never at the cost of mail.

Each daemon keeps its in-process cache in front; this is asked only on a local miss, and written
through after each probe with the verdict's TTL as the key's expiry. Every call waits at most
BackCacheTimeout; after a failure Redis is left alone for a while (the outage and the recovery are
logged once each), and any failure is a miss. Flushes are published so every daemon drops its
local copy too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import Config, ConfigError
from .stats import Stats
from .threads import start_quiet_thread

log = logging.getLogger("scam-back")

PREFIX = "scam-back:v1:"            # namespaced and versioned: a new format gets a new prefix
ADDRESS_PREFIX = PREFIX + "addr:"
FLUSH_CHANNEL = PREFIX + "flush"
PAUSE_FIRST, PAUSE_MAX = 2.0, 30.0  # seconds Redis is left alone after a failure, doubling
SUBSCRIBE_RETRY = 1.0     # the flush listener reconnects this often: flushes must reach it soon
PING_AFTER, DEAD_AFTER = 30.0, 45.0    # a silent subscription is pinged; no answer: reconnect
ADMIN_TIMEOUT = 10.0      # flushes walk the whole key space: not bound by BackCacheTimeout
SCAN_BATCH = 1000

# What a flush message asks every daemon to drop locally: (what, value).
FlushHandler = Callable[[str, str], None]
FLUSH_KINDS = ("address", "domain", "invalid", "all")


def is_flush(what: str, value: str) -> bool:
    """True for a flush that names what it drops (an empty address or domain would not)."""
    return what in FLUSH_KINDS and (bool(value) or what in ("invalid", "all"))


def read_password(config: Config) -> Optional[str]:
    """The BackCachePasswordFile's first line (read as root, before the privilege drop)."""
    path = config.cache_password_file
    if not path or not config.shared_cache:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(config.path, config.key_lines.get("cache_password_file", 0),
                          f"BackCachePasswordFile {path}: cannot read: {exc.strerror} (create it "
                          "with the Redis password on its first line, mode 0600)") from None
    if not password:
        raise ConfigError(config.path, config.key_lines.get("cache_password_file", 0),
                          f"BackCachePasswordFile {path}: the first line is empty (put the Redis "
                          "password on it)")
    return password


class SharedCache:
    """The Redis side of the cache: get, put, flush, and a subscriber for other daemons' flushes."""

    def __init__(self, url: str, timeout: float, stats: Optional[Stats] = None,
                 password: Optional[str] = None, shown: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url_shown = shown or url
        self.timeout, self.clock = timeout, clock
        self.stats = stats or Stats()
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0), health_check_interval=0)
        if password is not None:
            options["password"] = password
        self.client = redis.Redis.from_url(url, **options)
        # The subscriber blocks in a read; it gets its own client with no read timeout.
        self._sub_client = redis.Redis.from_url(url, **dict(options, socket_timeout=None,
                                                            socket_keepalive=True))
        self._admin_client = redis.Redis.from_url(url, **dict(
            options, socket_timeout=ADMIN_TIMEOUT, socket_connect_timeout=max(timeout, 1.0)))
        self.origin = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._pause_until = 0.0
        self._pause = PAUSE_FIRST
        self._stop = threading.Event()
        self._pubsub: Optional[redis.client.PubSub] = None
        self.listening = False          # subscribed to other daemons' flushes right now

    # ---- health ----

    @property
    def up(self) -> bool:
        return self._down_since is None

    def _usable(self) -> bool:
        return self._down_since is None or self.clock() >= self._pause_until

    def _failed(self, exc: Exception) -> None:
        self.stats.count("cache", "shared-error")
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since, self._pause = self.clock(), PAUSE_FIRST
            else:
                self._pause = min(PAUSE_MAX, self._pause * 2)
            self._pause_until = self.clock() + self._pause
        if first:
            log.warning("shared cache %s unavailable (%s): carrying on with the local cache, "
                        "asking Redis again in %g s", self.url_shown, _why(exc), PAUSE_FIRST)

    def _worked(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info("shared cache %s available again after %.0f s", self.url_shown,
                     self.clock() - since)

    def ping(self) -> bool:
        """True if Redis answers now (start-up); a failure is logged as an outage."""
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return False
        return True

    # ---- verdicts ----

    def _read(self, key: str) -> tuple[bool, Optional[tuple[bool, float]]]:
        """(reached Redis, (valid, seconds left) or None)."""
        if not self._usable():
            return False, None
        try:
            value, pttl = self.client.pipeline(transaction=False).get(
                ADDRESS_PREFIX + key).pttl(ADDRESS_PREFIX + key).execute()
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return False, None
        self._worked()
        if value not in (b"0", b"1") or pttl is None or pttl <= 0:
            return True, None
        return True, (value == b"0", pttl / 1000.0)

    def get(self, key: str) -> Optional[tuple[bool, float]]:
        """(valid, seconds left) for a lower-cased address, or None (a miss, or Redis away)."""
        reached, found = self._read(key)
        if reached:
            self.stats.count("cache", "shared-hit" if found else "shared-miss")
        return found

    def peek(self, key: str) -> Optional[tuple[bool, float]]:
        """Like get() but uncounted (for `check`)."""
        return self._read(key)[1]

    def put(self, key: str, valid: bool, ttl: float) -> None:
        """Write a verdict through with its TTL as the key's expiry (the original's 0/1 codes)."""
        if ttl <= 0 or not self._usable():
            return
        try:
            self.client.set(ADDRESS_PREFIX + key, b"0" if valid else b"1", px=int(ttl * 1000))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._worked()

    # ---- flushes ----

    @staticmethod
    def _scan(client: redis.Redis, pattern: str) -> Iterator[list[bytes]]:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def flush(self, what: str, value: str = "") -> tuple[int, int]:
        """Delete shared entries (what: address, domain, invalid, all) and tell every daemon;
        returns (entries deleted, daemons listening, this one included).

        Raises redis.RedisError (or OSError) when Redis cannot be reached: an admin must know a
        flush did not reach the other daemons.
        """
        if not is_flush(what, value):
            raise ValueError(f"cannot flush {what} {value!r}")
        client, deleted = self._admin_client, 0
        try:
            deleted = self._delete(client, what, value)
        finally:
            # Told even if the deletes stopped half way: every daemon drops its local copies.
            listeners = client.publish(FLUSH_CHANNEL, json.dumps(
                {"what": what, "value": value, "origin": self.origin}))
        self._worked()
        return deleted, int(listeners or 0)

    def _delete(self, client: redis.Redis, what: str, value: str) -> int:
        deleted = 0
        if what == "address":
            deleted = int(client.delete(ADDRESS_PREFIX + value.lower()))
        else:
            patterns = {"domain": [f"{ADDRESS_PREFIX}*@{_glob(value)}",
                                   f"{ADDRESS_PREFIX}*@*.{_glob(value)}"],
                        "invalid": [ADDRESS_PREFIX + "*"], "all": [ADDRESS_PREFIX + "*"]}[what]
            for pattern in patterns:
                for keys in self._scan(client, pattern):
                    if what == "invalid":
                        values = client.mget(keys)
                        keys = [k for k, v in zip(keys, values) if v == b"1"]
                    if keys:
                        deleted += int(client.delete(*keys))
        return deleted

    def listen(self, on_flush: FlushHandler) -> None:
        """Start the thread that applies other daemons' flushes to the local cache."""
        start_quiet_thread(lambda: self._listen(on_flush), "shared-cache-flushes")

    def _listen(self, on_flush: FlushHandler) -> None:
        # One connection attempt a second while Redis is away costs nothing, and a flush given
        # after Redis is back must reach this daemon at once, not after a long pause.
        while not self._stop.is_set():
            try:
                pubsub = self._pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(FLUSH_CHANNEL)
                self.listening = True
                heard = pinged = time.monotonic()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    now = time.monotonic()
                    if message is not None:
                        heard = now
                        if message.get("type") == "message":
                            self._apply(message.get("data"), on_flush)
                    elif now - heard > DEAD_AFTER:
                        # A connection a firewall dropped looks idle, not closed.
                        raise redis.ConnectionError("no answer to PING on the subscription")
                    elif now - heard > PING_AFTER and now - pinged > PING_AFTER:
                        pubsub.ping()
                        pinged = now
            except (redis.RedisError, OSError, ValueError):
                # The outage itself is logged by the verdict calls; just try again soon.
                self.listening = False
                self._stop.wait(SUBSCRIBE_RETRY)
            finally:
                self._close_pubsub()

    def _apply(self, data: object, on_flush: FlushHandler) -> None:
        try:
            message = json.loads(data)  # type: ignore[arg-type]
            what, value = str(message["what"]), str(message.get("value", ""))
        except (TypeError, ValueError, KeyError):
            log.warning("shared cache: ignored a malformed flush message")
            return
        if message.get("origin") == self.origin or not is_flush(what, value):
            return
        on_flush(what, value)
        log.info("shared cache: flushed %s%s locally (asked by another scam-back)", what,
                 f" {value}" if value else "")

    def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass

    def close(self) -> None:
        self._stop.set()
        for client in (self.client, self._sub_client, self._admin_client):
            try:
                client.close()
            except (redis.RedisError, OSError):
                pass


def _glob(text: str) -> str:
    """Escape Redis glob characters in a domain."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text.lower())


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]

