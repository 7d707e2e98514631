"""Minimal MTA-side sendmail milter protocol (v6) client for tests."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

# Protocol flags (libmilter mfdef.h); identical to pymilter's milter.P_*.
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000

MILTER_VERSION = 6
CHUNK_SIZE = 65535                      # MILTER_CHUNK_SIZE
MAX_PACKET = 16 * 1024 * 1024           # sanity bound on reply length
FAMILIES = {'inet': '4', 'inet6': '6', 'unix': 'L', 'local': 'L',
            'unknown': 'U'}
RESPONSES = {'c': 'continue', 'a': 'accept', 'r': 'reject', 't': 'tempfail',
             'd': 'discard', 'y': 'replycode', 's': 'skip'}
MODIFICATIONS = {'+': 'addrcpt', '2': 'addrcpt_par', '-': 'delrcpt',
                 'h': 'addheader', 'i': 'insheader', 'm': 'chgheader',
                 'b': 'replbody', 'e': 'chgfrom', 'q': 'quarantine'}


class MilterError(Exception):
    """Protocol violation, EOF, or socket failure talking to the milter."""


class MilterTimeout(MilterError):
    """The milter did not answer (or accept data) within the timeout."""


@dataclass
class Reply:
    """A milter response; ``waited``/``sent`` are False if negotiated away."""

    action: str
    code: str = ''
    text: str = ''
    waited: bool = True
    sent: bool = True

    @property
    def is_continue(self) -> bool:
        return self.action == 'continue'

    @property
    def is_accept(self) -> bool:
        return self.action == 'accept'

    @property
    def is_reject(self) -> bool:
        return self.action == 'reject' or (
            self.action == 'replycode' and self.code.startswith('5'))

    @property
    def is_tempfail(self) -> bool:
        return self.action == 'tempfail' or (
            self.action == 'replycode' and self.code.startswith('4'))

    @property
    def is_discard(self) -> bool:
        return self.action == 'discard'


@dataclass
class EomResult:
    """Final end-of-message reply plus the modifications sent before it.

    Action values: recipients/quarantine reason as-is; 'addrcpt_par' and
    'chgfrom' as 'addr ARGS'; 'addheader' as 'Name: value'; 'chgheader' and
    'insheader' as 'Name[index]: value'; 'replbody' as latin-1 decoded bytes.
    """

    reply: Reply
    actions: list[tuple[str, str]] = field(default_factory=list)


def _z(*parts: str) -> bytes:
    """Encode strings as consecutive NUL-terminated fields."""
    return b''.join(p.encode('utf-8', 'surrogateescape') + b'\0'
                    for p in parts)


def _fields(data: bytes) -> list[str]:
    """Split NUL-terminated fields (trailing NUL optional)."""
    if data.endswith(b'\0'):
        data = data[:-1]
    return [f.decode('utf-8', 'replace') for f in data.split(b'\0')]


def _open_socket(address: str, timeout: float) -> socket.socket:
    """Connect to unix:/local:PATH or inet:/inet6:PORT@HOST (bare PATH ok)."""
    kind, sep, rest = address.partition(':')
    kind, rest = (kind.lower(), rest) if sep else ('unix', address)
    if kind not in ('unix', 'local', 'inet', 'inet6'):
        raise ValueError(f'unsupported milter address: {address!r}')
    sock = None
    try:
        if kind in ('unix', 'local'):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(rest)
            return sock
        port, _, host = rest.partition('@')
        fam = socket.AF_INET if kind == 'inet' else socket.AF_INET6
        host = host.strip('[]') or ('127.0.0.1' if kind == 'inet' else '::1')
        info = socket.getaddrinfo(host, int(port), fam, socket.SOCK_STREAM)
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(info[0][4])
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        err = MilterTimeout if isinstance(exc, socket.timeout) else MilterError
        raise err(f'cannot connect to {address}: {exc!r}') from exc


class MilterClient:
    """Speak the MTA side of the milter protocol to a running milter."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self.sock: socket.socket | None = _open_socket(address, timeout)
        self.version = 0
        self.actions = 0
        self.protocol = 0
        self.symlists: dict[int, str] = {}

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- low level -------------------------------------------------------
    def _send(self, cmd: str, data: bytes = b'') -> None:
        if self.sock is None:
            raise MilterError('connection is closed')
        packet = struct.pack('!I', len(data) + 1) + cmd.encode() + data
        try:
            self.sock.sendall(packet)
        except socket.timeout as exc:
            raise MilterTimeout(f'timeout sending {cmd!r}') from exc
        except OSError as exc:
            raise MilterError(f'error sending {cmd!r}: {exc}') from exc

    def _recv_exact(self, size: int) -> bytes:
        if self.sock is None:
            raise MilterError('connection is closed')
        buf = bytearray()
        while len(buf) < size:
            try:
                chunk = self.sock.recv(size - len(buf))
            except socket.timeout as exc:
                raise MilterTimeout(
                    f'no reply from milter within {self.timeout}s') from exc
            except OSError as exc:
                raise MilterError(f'error reading from milter: {exc}') from exc
            if not chunk:
                raise MilterError('milter closed the connection (EOF)')
            buf += chunk
        return bytes(buf)

    def _recv(self) -> tuple[str, bytes]:
        (length,) = struct.unpack('!I', self._recv_exact(4))
        if not 1 <= length <= MAX_PACKET:
            raise MilterError(f'bad packet length {length}')
        packet = self._recv_exact(length)
        return chr(packet[0]), packet[1:]

    def _recv_response(self) -> tuple[str, bytes]:
        """Read the next packet, skipping SMFIR_PROGRESS keep-alives."""
        while True:
            code, data = self._recv()
            if code != 'p':
                return code, data

    @staticmethod
    def _to_reply(cmd: str, code: str, data: bytes) -> Reply:
        if code == 'y':
            text = data.rstrip(b'\0').decode('utf-8', 'replace')
            return Reply('replycode', text[:3], text)
        if code in RESPONSES:
            return Reply(RESPONSES[code])
        raise MilterError(f'unexpected reply {code!r} to {cmd!r}')

    def _macros(self, cmd: str, macros: dict[str, str] | None) -> None:
        if macros:
            pairs = [s for kv in macros.items() for s in kv]
            self._send('D', cmd.encode() + _z(*pairs))

    def _step(self, cmd: str, data: bytes, no_flag: int, nr_flag: int,
              macros: dict[str, str] | None = None) -> Reply:
        """Send one step honouring the negotiated P_NO*/P_NR* flags."""
        if self.protocol & no_flag:
            return Reply('continue', waited=False, sent=False)
        self._macros(cmd, macros)
        self._send(cmd, data)
        if self.protocol & nr_flag:
            return Reply('continue', waited=False)
        return self._to_reply(cmd, *self._recv_response())

    # -- protocol steps --------------------------------------------------
    def negotiate(self, actions: int = 0x1ff,
                  protocol: int = 0x1fffff) -> None:
        """SMFIC_OPTNEG: offer actions/protocol; store the milter's choice."""
        self._send('O', struct.pack('!III', MILTER_VERSION, actions, protocol))
        code, data = self._recv()
        if code != 'O' or len(data) < 12:
            raise MilterError(f'bad OPTNEG reply {code!r} {data!r}')
        self.version, self.actions, self.protocol = struct.unpack(
            '!III', data[:12])
        rest = data[12:]
        while len(rest) >= 4:       # optional SMFIR_SETSYMLIST lists
            (stage,) = struct.unpack('!I', rest[:4])
            names, _, rest = rest[4:].partition(b'\0')
            self.symlists[stage] = names.decode('ascii', 'replace')

    def connect(self, hostname: str, family: str = 'inet',
                address: str | None = None, port: int = 0,
                macros: dict[str, str] | None = None) -> Reply:
        fam = FAMILIES.get(family, family)
        if fam not in ('4', '6', 'L', 'U'):
            raise ValueError(f'unknown family {family!r}')
        data = _z(hostname) + fam.encode()
        if fam != 'U':
            data += struct.pack('!H', port) + _z(address or '')
        return self._step('C', data, P_NOCONNECT, P_NR_CONN, macros)

    def helo(self, name: str, macros: dict[str, str] | None = None) -> Reply:
        return self._step('H', _z(name), P_NOHELO, P_NR_HELO, macros)

    def mail(self, sender: str, *args: str,
             macros: dict[str, str] | None = None) -> Reply:
        return self._step('M', _z(sender, *args), P_NOMAIL, P_NR_MAIL,
                          macros)

    def rcpt(self, recipient: str, *args: str,
             macros: dict[str, str] | None = None) -> Reply:
        return self._step('R', _z(recipient, *args), P_NORCPT, P_NR_RCPT,
                          macros)

    def data(self, macros: dict[str, str] | None = None) -> Reply:
        return self._step('T', b'', P_NODATA, P_NR_DATA, macros)

    def unknown(self, command: str,
                macros: dict[str, str] | None = None) -> Reply:
        return self._step('U', _z(command), P_NOUNKNOWN, P_NR_UNKN, macros)

    def header(self, name: str, value: str) -> Reply:
        return self._step('L', _z(name, value), P_NOHDRS, P_NR_HDR)

    def eoh(self, macros: dict[str, str] | None = None) -> Reply:
        return self._step('N', b'', P_NOEOH, P_NR_EOH, macros)

    def body(self, chunk: bytes) -> Reply:
        """Send body data in CHUNK_SIZE pieces; stop at a non-continue."""
        reply = Reply('continue', waited=False, sent=False)
        for i in range(0, len(chunk), CHUNK_SIZE):
            reply = self._step('B', chunk[i:i + CHUNK_SIZE], P_NOBODY,
                               P_NR_BODY)
            if reply.action != 'continue':
                break
        return reply

    def eom(self, macros: dict[str, str] | None = None) -> EomResult:
        """SMFIC_BODYEOB: collect modification actions, then final reply."""
        self._macros('E', macros)
        self._send('E')
        actions: list[tuple[str, str]] = []
        while True:
            code, data = self._recv_response()
            if code not in MODIFICATIONS:
                return EomResult(self._to_reply('E', code, data), actions)
            kind = MODIFICATIONS[code]
            if code == 'b':
                actions.append((kind, data.decode('latin-1')))
            elif code in 'im':
                (index,) = struct.unpack('!I', data[:4])
                name, value = (_fields(data[4:]) + [''])[:2]
                actions.append((kind, f'{name}[{index}]: {value}'))
            elif code == 'h':
                name, value = (_fields(data) + [''])[:2]
                actions.append((kind, f'{name}: {value}'))
            else:
                actions.append((kind, ' '.join(f for f in _fields(data) if f)))

    def abort(self) -> None:
        """SMFIC_ABORT: reset the transaction (no reply expected)."""
        self._send('A')

    def quit(self) -> None:
        """SMFIC_QUIT, then close the socket."""
        try:
            if self.sock is not None:
                self._send('Q')
        finally:
            self.close()
