"""Backend faults (issue 4): every way an inner SMTP server can misbehave, each with one scripted
backend address on 127.0.0.1, TimeoutSMTPConnect 1 and TimeoutSMTPReply 1.

For each fault the MTA's RCPT answer arrives within connect + reply timeout + 1 s, it is the
configured fallback (continue; 451 4.4.3 with BackErrorTempfail: yes), nothing is cached, and
the next recipient on the same MTA connection is still verified. Two daemons (one per error
policy) share every fault backend, one domain per fault.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Union

import pytest

from ..smtpbackend import Backend, ScriptedBackend, refused_port
from .conftest import (HangingListener, Mta, ask, cache_entries, conf, is_invalid, is_tempfail,
                       show, stop_together, verdict_lines, wait_until)

CONNECT_TIMEOUT = REPLY_TIMEOUT = 1.0
MARGIN = 1.0
BOUND = CONNECT_TIMEOUT + REPLY_TIMEOUT + MARGIN
BANNER = b"220 scripted.test ESMTP\r\n"
EHLO_OK = b"250-scripted.test\r\n250 8BITMIME\r\n"


@dataclass
class Fault:
    """How one backend misbehaves: a ScriptedBackend's banner/replies, or a special listener."""

    banner: object = BANNER
    replies: dict = field(default_factory=dict)
    never_banner: bool = False
    special: str = ""           # "refused" or "hang-connect"


FAULTS: dict[str, Fault] = {
    "refused-connect": Fault(special="refused"),
    "connect-hangs": Fault(special="hang-connect"),
    "banner-never-sent": Fault(never_banner=True),
    "closed-before-banner": Fault(banner="close"),
    "banner-421": Fault(banner=[(0.0, b"421 4.3.2 Service not available, closing\r\n"), "close"]),
    "banner-554": Fault(banner=b"554 5.7.1 No SMTP service here\r\n"),
    "stall-after-banner": Fault(replies={"EHLO": "hang", "HELO": "hang"}),
    "stall-after-ehlo": Fault(replies={"MAIL": "hang"}),
    "stall-after-mail": Fault(replies={"RCPT": "hang"}),
    "stall-after-rcpt": Fault(replies={"RCPT": [(0.0, b"250-2.1.5 one line of a longer reply\r\n"),
                                                "hang"]}),
    "closed-after-banner": Fault(banner=[(0.0, BANNER), "close"]),
    "closed-mid-reply": Fault(replies={"RCPT": [(0.0, b"550-5.1.1 no such\r\n550-5.1.1 us"),
                                                "close"]}),
    "garbage-reply-line": Fault(replies={"RCPT": b"\x01\xfe garbage, not SMTP \x7f\r\n"}),
    "overlong-reply-line": Fault(replies={"RCPT": b"550 5.1.1 " + b"x" * 200_000 + b"\r\n"}),
    "helo-refused": Fault(replies={"EHLO": b"550 5.7.1 EHLO refused\r\n",
                                   "HELO": b"550 5.7.1 HELO refused\r\n"}),
    "mail-from-refused": Fault(replies={"MAIL": b"550 5.7.1 Sender refused\r\n"}),
    "421-mid-session": Fault(replies={"RCPT": [(0.0, b"421 4.3.2 Shutting down\r\n"), "close"]}),
    "greylist-450": Fault(replies={"RCPT": b"450 4.2.0 Greylisted, try again later\r\n"}),
    "greylist-451": Fault(replies={"RCPT": b"451 4.7.1 Greylisted, please retry\r\n"}),
    "too-many-recipients-452": Fault(replies={"RCPT": b"452 4.5.3 Too many recipients\r\n"}),
    "policy-550-5.7.1": Fault(replies={"RCPT": b"550 5.7.1 Recipient refused by policy\r\n"}),
}

SPLIT_BANNER = [(0.0, b"220-scripted.test first line of th"), (0.25, b"e banner\r\n220-second"),
                (0.25, b" line\r\n"), (0.2, b"220 ready\r\n")]
SPLIT_EHLO = [(0.0, b"250-scripted.test hel"), (0.25, b"lo\r\n250-PIPEL"), (0.25, b"INING\r\n"),
              (0.2, b"250 8BITMIME\r\n")]
# Faults after which the backend is mute or gone: no session to it may stay open once the MTA
# connections are closed. (A backend that answered RCPT with 4xx or 5.7.1 is healthy, and its
# session may be pooled for the next probe.)
DEAD_SESSIONS = ("connect-hangs", "banner-never-sent", "closed-before-banner", "banner-421",
                 "banner-554", "stall-after-banner", "stall-after-ehlo", "stall-after-mail",
                 "stall-after-rcpt", "closed-after-banner", "closed-mid-reply", "overlong-reply-line",
                 "helo-refused", "mail-from-refused", "421-mid-session")
VARIANTS = ("accept", "tempfail")


class FaultEnv:
    """Every fault backend, a working backend (ok.test), and one daemon per error policy."""

    def __init__(self) -> None:
        self.servers: dict[str, Union[ScriptedBackend, HangingListener, None]] = {}
        self.ports: dict[str, int] = {}
        self.good = Backend(users={"good@ok.test"})
        self.daemons: dict[str, object] = {}

    def start(self, module_daemons) -> "FaultEnv":  # type: ignore[no-untyped-def]
        for name, fault in FAULTS.items():
            server: Union[ScriptedBackend, HangingListener, None]
            if fault.special == "refused":
                server, port = None, refused_port()
            elif fault.special == "hang-connect":
                server = HangingListener().start()
                port = server.port
            else:
                server = ScriptedBackend(fault.banner, fault.replies,
                                         accept_but_never_banner=fault.never_banner).start()
                port = server.port
            self.servers[name], self.ports[name] = server, port
        split = ScriptedBackend(SPLIT_BANNER, {"EHLO": SPLIT_EHLO,
                                               "RCPT": b"550 5.1.1 No such user here\r\n"}).start()
        self.servers["split-replies"], self.ports["split-replies"] = split, split.port
        self.good.start()
        routes: dict = {f"{name}.test": port for name, port in self.ports.items()}
        routes["ok.test"] = self.good.port
        self.daemons["accept"] = module_daemons(conf(routes))
        self.daemons["tempfail"] = module_daemons(conf(routes, "BackErrorTempfail: yes\n"))
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            if server is not None:
                server.stop()
        self.good.stop()


@pytest.fixture(scope="module")
def env(module_daemons) -> Iterator[FaultEnv]:  # type: ignore[no-untyped-def]
    faults = FaultEnv()
    try:
        yield faults.start(module_daemons)
    finally:
        module_daemons.discard()
        faults.stop()


def assert_fallback(variant: str, reply, what: str) -> None:  # type: ignore[no-untyped-def]
    if variant == "tempfail":
        assert is_tempfail(reply), f"{what}: want 451 4.4.3, got {show(reply)}"
    else:
        assert reply.action == "continue", f"{what}: want continue, got {show(reply)}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_backend_fault_gets_the_fallback_fast_uncached_and_the_next_recipient_works(
        env: FaultEnv, fault: str, variant: str) -> None:
    daemon = env.daemons[variant]
    address = f"{variant}-user@{fault}.test"
    with Mta(daemon) as mta:
        reply, elapsed = mta.timed_rcpt(address)
        assert elapsed <= BOUND, f"answered after {elapsed:.2f} s (bound {BOUND} s)"
        assert_fallback(variant, reply, fault)
        # The next recipient on the same MTA connection is still verified.
        after, after_elapsed = mta.timed_rcpt(f"{variant}-{fault}-bad@ok.test")
        assert is_invalid(after), f"next recipient: {show(after)}"
        assert after_elapsed <= BOUND
        good = mta.rcpt("good@ok.test")
        assert good.action == "continue", show(good)
    # Nothing was cached: asked again, it is again unverified (never a cached verdict).
    again = ask(daemon, address)[0]
    assert_fallback(variant, again, f"{fault}, asked again")
    lines = verdict_lines(daemon, address)
    assert lines, "no verdict line logged"
    assert all("verdict=unverified" in line and "source=cache" not in line for line in lines), lines


@pytest.mark.parametrize("variant", VARIANTS)
def test_multiline_banner_and_ehlo_in_pieces_with_pauses_still_verify(env: FaultEnv,
                                                                       variant: str) -> None:
    with Mta(env.daemons[variant]) as mta:
        reply, elapsed = mta.timed_rcpt(f"{variant}-nobody@split-replies.test")
    assert is_invalid(reply), show(reply)
    assert elapsed <= BOUND
    split = env.servers["split-replies"]
    assert f"RCPT TO:<{variant}-nobody@split-replies.test>" in split.transcript  # type: ignore


def test_zz_no_fault_verdict_is_saved_and_no_backend_session_is_left_open(env: FaultEnv) -> None:
    """Runs last in this module: no session to a mute, closed or refusing backend is left
    waiting, and the cache file saved at SIGTERM holds no fault address."""
    fault_ports = [env.ports[name] for name in DEAD_SESSIONS]
    daemons = [env.daemons[v] for v in VARIANTS]
    # Every fault once more (all at once, so this test stands alone), and one real verdict.
    jobs = [(d, f"final@{name}.test") for d in daemons for name in FAULTS]
    jobs += [(d, "final@split-replies.test") for d in daemons]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(lambda job: ask(*job), jobs, timeout=30))
    for daemon in daemons:
        names = {f"{port:04X}": name for name, port in env.ports.items()}
        assert wait_until(lambda: not daemon.sockets_to(fault_ports), 5.0), \
            "sessions left open to: " + ", ".join(
                names.get(s.split("->")[1].split()[0][-4:], s) for s in daemon.sockets_to(fault_ports))
    results = stop_together(daemons)  # type: ignore[arg-type]
    for daemon, (code, elapsed) in zip(daemons, results):
        assert code == 0, f"exit {code} after {elapsed:.1f} s"
        entries = cache_entries(daemon.cachefile)
        leaked = [a for a in entries if a.split("@")[-1][:-5] in FAULTS]
        assert not leaked, f"cached although the backend was faulty: {leaked}"
        assert "split-replies.test" in " ".join(entries)  # a real verdict was saved
