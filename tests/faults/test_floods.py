"""Dictionary attacks and floods (issue 4): BackMaxInvalidPerConnection, one probe per address,
BackMaxProbes, and BackInvalidCacheMax keeping good entries in the cache."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

from ..milterclient import MilterError
from ..smtpbackend import Backend
from .conftest import (Mta, RestartableBackend, TrackingBackend, ask, conf, is_invalid,
                       is_tempfail, random_ip, show)

SLOW_RCPT = {"RCPT": [(0.5, b"550 5.1.1 No such user\r\n")]}


def concurrent_rcpts(daemon, addresses: list[str], timeout: float = 30.0):  # type: ignore
    """One MTA connection per address, all asking at the same moment; returns the replies."""
    barrier = threading.Barrier(len(addresses), timeout=timeout)
    rng = random.Random(len(addresses))
    ips = [random_ip(rng) for _ in addresses]

    def one(index: int):  # type: ignore[no-untyped-def]
        with Mta(daemon, ip=ips[index], timeout=timeout) as mta:
            barrier.wait()
            return mta.rcpt(addresses[index])
    with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
        return list(pool.map(one, range(len(addresses)), timeout=timeout + 10))


class Env:
    def __init__(self, module_daemons) -> None:  # type: ignore[no-untyped-def]
        self.backend = Backend(users={"good@example.net"}).start()
        self.slow = TrackingBackend(replies=SLOW_RCPT).start()
        self.daemon = module_daemons(conf({"example.net": self.backend.port,
                                           "slow.test": self.slow.port}))

    def stop(self) -> None:
        self.backend.stop()
        self.slow.stop()


@pytest.fixture(scope="module")
def env(module_daemons) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    servers = Env(module_daemons)
    try:
        yield servers
    finally:
        module_daemons.discard()
        servers.stop()


def test_dictionary_attack_gets_550_ten_times_then_421_4_7_0(env: Env) -> None:
    replies, times = [], []
    with Mta(env.daemon, timeout=60) as mta:
        for number in range(12):
            started = time.monotonic()
            try:
                replies.append(mta.rcpt(f"dict{number}@example.net"))
            except MilterError:           # the milter ended the connection after its 421
                break
            times.append(time.monotonic() - started)
    assert len(replies) >= 11, [show(r) for r in replies]
    assert all(is_invalid(r) for r in replies[:10]), [show(r) for r in replies[:10]]
    refused = replies[10]
    assert refused.action == "replycode" and refused.text.startswith("421 4.7.0"), show(refused)
    for later in replies[11:]:
        assert later.action in ("replycode", "tempfail") and later.text.startswith("421"), show(later)
    assert times[9] >= times[0] + 0.2, f"not slowed: {times}"
    # Only that connection is refused: the next one is served.
    good, bad = ask(env.daemon, "good@example.net", "dict0@example.net")
    assert good.action == "continue" and is_invalid(bad), (show(good), show(bad))


def test_concurrent_asks_for_one_new_address_share_one_backend_probe(env: Env) -> None:
    address = "same-new@slow.test"
    replies = concurrent_rcpts(env.daemon, [address] * 20)
    assert all(is_invalid(r) for r in replies), [show(r) for r in replies]
    probes = [line for line in list(env.slow.transcript) if line == f"RCPT TO:<{address}>"]
    assert len(probes) == 1, f"{len(probes)} RCPTs at the backend for one address"


@pytest.mark.parametrize("check", ["0", "21600"], ids=["no-accept-all-check", "default-check"])
def test_back_max_probes_caps_the_rcpts_in_flight(daemons, check: str) -> None:
    """The accept-all checks (on by default, one per domain) are probes under the cap too."""
    with TrackingBackend(replies=SLOW_RCPT) as slow:
        routes = {f"slow{n}.test": slow.port for n in range(3)}
        daemon = daemons(conf(routes, f"BackMaxProbes: 2\nBackCatchAllCheck: {check}\n"))
        replies = concurrent_rcpts(daemon, [f"capped{n}@slow{n % 3}.test" for n in range(10)])
        assert all(is_invalid(r) for r in replies), [show(r) for r in replies]
        assert 1 <= slow.max_in_flight <= 2, f"{slow.max_in_flight} RCPTs in flight at once"


def test_flood_of_unknown_addresses_cannot_evict_a_known_good_one(daemons) -> None:
    backend = RestartableBackend(users={"known@flood.test"}).start()
    try:
        daemon = daemons(conf({"flood.test": backend.port},
                              "BackCacheMax: 1000\nBackInvalidCacheMax: 100\nBackErrorTempfail: yes\n"))
        assert ask(daemon, "known@flood.test")[0].action == "continue"
        rng = random.Random(4)
        flood = [f"r{rng.getrandbits(64):016x}@flood.test" for _ in range(2000)]
        batches = [flood[i:i + 5] for i in range(0, len(flood), 5)]   # 5 per connection
        ips = [random_ip(rng) for _ in batches]

        def run(index: int) -> int:
            replies = ask(daemon, *batches[index], ip=ips[index])
            return sum(is_invalid(r) for r in replies)
        with ThreadPoolExecutor(max_workers=8) as pool:
            rejected = sum(pool.map(run, range(len(batches)), timeout=180))
        assert rejected == len(flood)
        backend.stop()                      # only the cache can answer now
        known, unknown = ask(daemon, "known@flood.test", "never-seen@flood.test")
        assert is_tempfail(unknown), f"the backend should be down: {show(unknown)}"
        assert known.action == "continue", f"the flood evicted a good entry: {show(known)}"
    finally:
        backend.stop()
