"""Test SMTP backends: a recording aiosmtpd server and a scripted raw TCP server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from aiosmtpd.smtp import SMTP, Envelope, Session

JOIN_TIMEOUT = 5.0
POLL = 0.1  # seconds between checks of a stop flag
UNKNOWN = '550 5.1.1 <{}>: Recipient address rejected: User unknown'


_HELD: dict[int, socket.socket] = {}       # refused ports, bound until released


def refused_port(host: str = '127.0.0.1') -> int:
    """Return a port that refuses connections: bound but never listening, and held until
    release_port(), so no listener started later (a backend, Postfix, Redis) is given it."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = int(sock.getsockname()[1])
    _HELD[port] = sock
    return port


def release_port(port: int) -> None:
    """Free a port from refused_port, so that a server can listen on it."""
    sock = _HELD.pop(port, None)
    if sock is not None:
        sock.close()


def _text(raw: bytes) -> str:
    """Decode one received line, without its CRLF (or bare LF)."""
    return raw.removesuffix(b'\n').removesuffix(b'\r').decode('utf-8', errors='replace')


class _Recorder:
    """Records shared by both servers (guarded by a condition) and a bounded wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.transcript: list[str] = []
        self.connections = 0

    def _record(self, line: Optional[str] = None, connection: bool = False) -> None:
        with self._cond:
            if line is not None:
                self.transcript.append(line)
            self.connections += connection
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait at most `timeout` s until predicate() is true; return its last value."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_line(self, line: str, timeout: float = 5.0) -> bool:
        """Wait at most `timeout` s until `line` is in the transcript."""
        return self.wait_for(lambda: line in self.transcript, timeout)

    def __enter__(self) -> Any:
        return self.start()  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        self.stop()  # type: ignore[attr-defined]


class _RecordingSMTP(SMTP):
    """aiosmtpd SMTP that reports every command line, exactly as read, to its Backend."""

    def __init__(self, backend: Backend, **kwargs: Any) -> None:
        super().__init__(_Handler(backend), **kwargs)
        self._backend, self._partial = backend, b''

    def _cb_client_connected(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        original = reader.readuntil

        # Only command lines are read with the default separator (DATA uses
        # b'\r\n', AUTH readline()); an over-long line arrives in parts.
        async def readuntil(separator: bytes = b'\n') -> bytes:
            try:
                line = await original(separator)
            except asyncio.LimitOverrunError as err:
                if separator == b'\n':
                    self._partial += bytes(reader._buffer[:err.consumed])  # type: ignore
                raise
            if separator == b'\n':
                self._backend._record(_text(self._partial + line))
                self._partial = b''
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign, assignment]


class _Handler:
    """aiosmtpd handler hooks that read the Backend's current settings."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        reply = self.b.helo_reply or f'250 {server.hostname}'
        session.host_name = hostname if reply.startswith('2') else None
        return reply

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        reply = self.b.ehlo_reply
        session.host_name = hostname if reply is None or reply.startswith('2') else None
        return responses if reply is None else reply.splitlines()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.b.mail_reply or '250 OK'
        if reply.startswith('2'):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.b.rcpt_reply_for(address)
        if reply.startswith('2'):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.b._cond:
            self.b.delivered.append((envelope.mail_from or '', list(envelope.rcpt_tos),
                                     bytes(envelope.original_content or b'')))
            self.b._cond.notify_all()
        return '250 2.0.0 OK queued'


class Backend(_Recorder):
    """Real SMTP server (aiosmtpd, own event loop thread) on an OS-chosen port.

    Greets with '220 <hostname> <banner>'. users, rcpt_replies, helo_reply,
    ehlo_reply and mail_reply are plain attributes read on every command:
    reassign or mutate them (or use the set_* methods) while running.
    """

    def __init__(self, users: Iterable[str] = (),
                 rcpt_replies: Optional[Mapping[str, str]] = None, *,
                 helo_reply: Optional[str] = None, ehlo_reply: Optional[str] = None,
                 mail_reply: Optional[str] = None, banner: str = 'ESMTP test backend',
                 hostname: str = 'backend.test', host: str = '127.0.0.1') -> None:
        super().__init__()
        self.users: set[str] = set(users)
        self.rcpt_replies: dict[str, str] = dict(rcpt_replies or {})
        self.helo_reply, self.ehlo_reply, self.mail_reply = helo_reply, ehlo_reply, mail_reply
        self.banner, self.hostname, self.host, self.port = banner, hostname, host, 0
        self.delivered: list[tuple[str, list[str], bytes]] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def set_users(self, users: Iterable[str]) -> None:
        self.users = set(users)

    def set_rcpt_replies(self, replies: Mapping[str, str]) -> None:
        self.rcpt_replies = dict(replies)

    def set_rcpt_reply(self, address: str, reply: Optional[str]) -> None:
        """Override the reply for one address (None removes the override)."""
        replies = {k: v for k, v in self.rcpt_replies.items() if k.lower() != address.lower()}
        if reply is not None:
            replies[address] = reply
        self.rcpt_replies = replies

    def rcpt_reply_for(self, address: str) -> str:
        """The reply line RCPT TO:<address> gets right now."""
        key = address.lower()
        for addr, reply in list(self.rcpt_replies.items()):
            if addr.lower() == key:
                return reply
        known = any(u.lower() == key for u in list(self.users))
        return '250 2.1.5 OK' if known else UNKNOWN.format(address)

    def clear(self) -> None:
        """Forget transcript, connection count and deliveries."""
        with self._cond:
            self.transcript.clear()
            self.delivered.clear()
            self.connections = 0

    def _factory(self) -> _RecordingSMTP:
        self._record(connection=True)
        return _RecordingSMTP(self, hostname=self.hostname, ident=self.banner,
                              enable_SMTPUTF8=True, loop=self._loop)

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(loop.create_server(self._factory, self.host, 0))
            self.port = int(server.sockets[0].getsockname()[1])
        except BaseException as err:  # reported by start()
            self._error = err
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
            server.close()
            tasks = asyncio.all_tasks(loop)  # a session's cancel closes its socket
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), JOIN_TIMEOUT))
            loop.run_until_complete(asyncio.sleep(0.01))  # let transports close
        finally:
            loop.close()

    def start(self, timeout: float = JOIN_TIMEOUT) -> Backend:
        if self._thread is not None:
            raise RuntimeError('backend already running')
        self._error, self._loop, ready = None, asyncio.new_event_loop(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._loop, ready),
                                        name='smtp-backend', daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f'backend failed to start: {self._error!r}')
        return self

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Drop all connections, close the listener, end the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        self._thread = self._loop = None
        if thread is None or loop is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # loop already closed: start() failed
            pass
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError('backend thread did not stop in time')


Piece = Union[tuple[float, bytes], str]  # (delay_seconds, chunk), 'close' or 'hang'
Step = Union[bytes, str, Sequence[Piece]]
Replies = Union[Mapping[str, Step], Callable[[str, str, int], Optional[Step]]]

DEFAULT_REPLIES: dict[str, Step] = {
    'EHLO': b'250-scripted.test\r\n250 8BITMIME\r\n', 'HELO': b'250 scripted.test\r\n',
    'MAIL': b'250 2.1.0 Ok\r\n', 'RCPT': b'250 2.1.5 Ok\r\n', 'RSET': b'250 2.0.0 Ok\r\n',
    'NOOP': b'250 2.0.0 Ok\r\n', 'DATA': b'554 5.5.1 Error: no DATA in scripted backend\r\n',
    'QUIT': [(0.0, b'221 2.0.0 Bye\r\n'), 'close'],
}
UNRECOGNIZED = b'502 5.5.2 Error: command not recognized\r\n'


class ScriptedBackend(_Recorder):
    """Raw threaded TCP server replaying a script, for fault injection.

    The banner (or banner(conn_no)) and each reply are steps: bytes sent at
    once, 'close', 'hang', or a list of (delay_seconds, bytes) pieces that
    may end in 'close' (drop the connection) or 'hang' (go mute: keep reading
    and recording, never answer, until the client leaves or stop()).
    `replies` maps a verb (EHLO, MAIL, ...) to a step, or is a callable
    (verb, line, conn_no) -> step or None; the fallback is DEFAULT_REPLIES.
    """

    refused_port = staticmethod(refused_port)

    def __init__(self, banner: Union[Step, Callable[[int], Step]] = b'220 scripted.test ESMTP\r\n',
                 replies: Optional[Replies] = None, *,
                 accept_but_never_banner: bool = False, host: str = '127.0.0.1') -> None:
        super().__init__()
        self.banner, self.replies = banner, replies if replies is not None else {}
        self.accept_but_never_banner = accept_but_never_banner
        self.host, self.port = host, 0
        self.raw_lines: list[bytes] = []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> ScriptedBackend:
        if self._threads:
            raise RuntimeError('scripted backend already running')
        self._stop.clear()
        family = socket.AF_INET6 if ':' in self.host else socket.AF_INET
        listener = socket.create_server((self.host, 0), family=family)
        listener.settimeout(POLL)
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, listener)
        return self

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Stop; each thread sees the flag within POLL s and closes its own socket."""
        self._stop.set()
        deadline, stuck = time.monotonic() + timeout, 0
        while True:  # the acceptor comes first: once it is joined nothing is added
            with self._lock:
                if not self._threads:
                    break
                thread = self._threads.pop(0)
            thread.join(max(0.0, deadline - time.monotonic()))
            stuck += thread.is_alive()
        if stuck:
            raise RuntimeError(f'{stuck} scripted backend thread(s) did not stop')

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name='scripted-backend')
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        with listener:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                self._record(connection=True)
                self._spawn(self._serve, conn, self.connections)

    def _send(self, conn: socket.socket, step: Step) -> Optional[str]:
        """Play a step; return 'close' or 'hang' when it ends with one."""
        pieces = [(0.0, step)] if isinstance(step, bytes) else (
            [step] if isinstance(step, str) else step)
        for piece in pieces:
            if isinstance(piece, str):
                if piece not in ('close', 'hang'):
                    raise ValueError(f'unknown scripted action {piece!r}')
                return piece
            delay, data = piece
            if delay > 0 and self._stop.wait(delay):
                return 'close'
            try:
                conn.sendall(data)
            except OSError:
                return 'close'
        return None

    def _received(self, raw: bytes) -> str:
        with self._cond:
            self.raw_lines.append(raw)
        self._record(_text(raw))
        return _text(raw)

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.settimeout(POLL)
            banner = self.banner(number) if callable(self.banner) else self.banner
            state = 'hang' if self.accept_but_never_banner else self._send(conn, banner)
            buf = b''
            while state != 'close' and not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:  # client closed; keep an unterminated last line
                    if buf:
                        self._received(buf)
                    return
                buf += chunk
                while b'\n' in buf and state != 'close':
                    raw, buf = buf.split(b'\n', 1)
                    line = self._received(raw + b'\n')
                    if state != 'hang':
                        state = self._send(conn, self._reply(line, number))

    def _reply(self, line: str, number: int) -> Step:
        verb, replies = line.split(' ', 1)[0].upper(), self.replies
        step = replies(verb, line, number) if callable(replies) else replies.get(verb)
        return DEFAULT_REPLIES.get(verb, UNRECOGNIZED) if step is None else step
