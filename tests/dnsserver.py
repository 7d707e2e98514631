"""Tiny threaded UDP DNS responder (MX, A, AAAA from dicts) for tests."""

from __future__ import annotations

import socket
import threading
from typing import Any, Iterable, Mapping, Optional

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

JOIN_TIMEOUT = 5.0
POLL = 0.1  # seconds between checks of the stop flag


def _key(name: str) -> str:
    """Normalise a domain name: lower case, no trailing dot."""
    return name.lower().rstrip('.')


def _lookup(table: Mapping[str, list[Any]], name: str) -> Optional[list[Any]]:
    """Case- and trailing-dot-insensitive lookup; None if the name is absent."""
    for key, value in list(table.items()):  # list(): the test thread may mutate it
        if _key(key) == name:
            return list(value)
    return None


class DNSServer:
    """UDP DNS server on an OS-chosen port answering MX/A/AAAA from dicts.

    mx, a, aaaa, servfail and drop are plain attributes read on every query:
    reassign or mutate them while running. A name present in any of mx/a/aaaa
    answers NOERROR (with no records for a missing type); any other name gets
    NXDOMAIN. Names in `servfail` get SERVFAIL; names in `drop` get no answer
    (the client times out). `queries` records (name, type) of every question.
    """

    def __init__(self, mx: Optional[Mapping[str, list[tuple[int, str]]]] = None,
                 a: Optional[Mapping[str, list[str]]] = None,
                 aaaa: Optional[Mapping[str, list[str]]] = None, *,
                 servfail: Iterable[str] = (), drop: Iterable[str] = (),
                 ttl: int = 300, host: str = '127.0.0.1') -> None:
        self.mx: dict[str, list[tuple[int, str]]] = dict(mx or {})
        self.a: dict[str, list[str]] = dict(a or {})
        self.aaaa: dict[str, list[str]] = dict(aaaa or {})
        self.servfail: set[str] = set(servfail)
        self.drop: set[str] = set(drop)
        self.ttl, self.host, self.port = ttl, host, 0
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _rdata_texts(self, name: str, rdtype: dns.rdatatype.RdataType) -> Optional[list[str]]:
        """Rdata texts for name/type ([] = NODATA), or None for NXDOMAIN."""
        mx, a, aaaa = (_lookup(t, name) for t in (self.mx, self.a, self.aaaa))
        if mx is None and a is None and aaaa is None:
            return None
        if rdtype == dns.rdatatype.MX:
            return [f'{pref} {host if host.endswith(".") else host + "."}'
                    for pref, host in mx or []]
        return {dns.rdatatype.A: a, dns.rdatatype.AAAA: aaaa}.get(rdtype) or []

    def _answer(self, wire: bytes) -> Optional[bytes]:
        """The response to one query packet, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = _key(question.name.to_text())
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
            if name in {_key(n) for n in list(self.drop)}:
                return None
            if name in {_key(n) for n in list(self.servfail)}:
                response.set_rcode(dns.rcode.SERVFAIL)
                continue
            texts = self._rdata_texts(name, question.rdtype)
            if texts is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif texts:
                response.answer.append(dns.rrset.from_text_list(
                    question.name, self.ttl, dns.rdataclass.IN, question.rdtype, texts))
        return response.to_wire()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            while not self._stop.is_set():
                try:
                    wire, peer = sock.recvfrom(65535)
                except socket.timeout:
                    continue
                except OSError:
                    return
                reply = self._answer(wire)
                if reply is not None:
                    try:
                        sock.sendto(reply, peer)
                    except OSError:
                        pass

    def start(self) -> DNSServer:
        if self._thread is not None:
            raise RuntimeError('DNS server already running')
        self._stop.clear()
        family = socket.AF_INET6 if ':' in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((self.host, 0))
        sock.settimeout(POLL)
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, args=(sock,),
                                        name='dns-server', daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Stop serving; the thread closes the socket within POLL s (idempotent)."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError('DNS server thread did not stop in time')

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
