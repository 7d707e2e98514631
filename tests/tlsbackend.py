"""Test certificates and test backends for STARTTLS and LMTP.

make_pki() makes a throwaway CA and server certificates with the openssl command (no network,
a few EC keys: fast). TLSBackend is tests/smtpbackend.py's recording aiosmtpd Backend that can
offer STARTTLS (tls_context=) and speak LMTP (lmtp=True, aiosmtpd's LMTP: LHLO only, EHLO and
HELO refused with 500); for every command line it records whether it arrived inside TLS, and
with which protocol version, as the server's own TLS layer saw it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

from aiosmtpd.lmtp import LMTP

from .smtpbackend import Backend, _RecordingSMTP, _text

OPENSSL_TIMEOUT = 30.0

# name -> subjectAltName of each server certificate the CA signs.
SERVER_CERTS = {
    "server": "DNS:localhost,IP:127.0.0.1",        # right for 127.0.0.1 and for localhost
    "name-only": "DNS:localhost",                   # right for localhost only, not the address
    "other": "DNS:other.example",                   # right for neither
}


def _openssl(*args: str, cwd: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=OPENSSL_TIMEOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr[-2000:]}")


@dataclass(frozen=True)
class Pki:
    """Paths of a test CA and of server certificates it signed (PEM files, mode 0644)."""

    directory: str
    ca: str                     # the CA certificate: what BackTLSCAFile names
    self_signed: str            # a server certificate for 127.0.0.1 that no CA signed

    def cert(self, name: str) -> tuple[str, str]:
        """(certificate, key) of one of SERVER_CERTS or "self-signed"."""
        return (os.path.join(self.directory, f"{name}.pem"),
                os.path.join(self.directory, f"{name}.key"))

    def server_context(self, name: str = "server") -> ssl.SSLContext:
        """A server-side context presenting one certificate (no client certificates asked)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.cert(name))
        return context


def make_pki(directory: str) -> Pki:
    """A CA and its server certificates in `directory` (which must exist)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
             "-subj", "/CN=scam-back test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    for name, san in SERVER_CERTS.items():
        with open(os.path.join(directory, f"{name}.ext"), "w") as handle:
            handle.write(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                         "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                         "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={san.split(',')[0].split(':', 1)[1]}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=directory)
    _openssl("req", "-x509", *ec, "-keyout", "self-signed.key", "-out", "self-signed.pem",
             "-days", "30", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", cwd=directory)
    for entry in os.listdir(directory):
        os.chmod(os.path.join(directory, entry), 0o644)
    return Pki(directory, os.path.join(directory, "ca.pem"),
               os.path.join(directory, "self-signed.pem"))


class _TLSRecordingSMTP(_RecordingSMTP):
    """_RecordingSMTP that also records, per command line, the TLS version it arrived under."""

    def _cb_client_connected(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        recording = reader.readuntil       # the parent's: it records the transcript

        async def readuntil(separator: bytes = b"\n") -> bytes:
            line = await recording(separator)
            if separator == b"\n":
                self._backend._record_tls(_text(line), self._tls_version())
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign, assignment]

    def _tls_version(self) -> Optional[str]:
        """The negotiated protocol ("TLSv1.3") once STARTTLS completed, else None."""
        protocol = self._tls_protocol
        if protocol is None:
            return None
        ssl_object = protocol._extra.get("ssl_object")  # type: ignore[attr-defined]
        return ssl_object.version() if ssl_object is not None else None


class _TLSRecordingLMTP(_TLSRecordingSMTP, LMTP):
    """The same over aiosmtpd's LMTP: LHLO greets; HELO and EHLO get 500."""


class TLSBackend(Backend):
    """Backend that offers STARTTLS when given a tls_context, and speaks LMTP when lmtp=True.

    tls_lines holds (command line, TLS version or None) for every line the server read.
    """

    def __init__(self, *args: Any, tls_context: Optional[ssl.SSLContext] = None,
                 lmtp: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_context, self.lmtp = tls_context, lmtp
        self.tls_lines: list[tuple[str, Optional[str]]] = []

    def _record_tls(self, line: str, version: Optional[str]) -> None:
        with self._cond:
            self.tls_lines.append((line, version))
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.tls_lines.clear()
        super().clear()

    def version_of(self, prefix: str) -> list[Optional[str]]:
        """The TLS version of every recorded line that starts with `prefix` (None: in the clear)."""
        with self._cond:
            return [version for line, version in self.tls_lines
                    if line.upper().startswith(prefix.upper())]

    def _factory(self) -> _RecordingSMTP:  # type: ignore[override]
        self._record(connection=True)
        cls = _TLSRecordingLMTP if self.lmtp else _TLSRecordingSMTP
        return cls(self, hostname=self.hostname, ident=self.banner, enable_SMTPUTF8=True,
                   loop=self._loop, tls_context=self.tls_context)
