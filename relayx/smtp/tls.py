"""
The inbound TLS context for STARTTLS: certificate (with its chain) and key
from files, TLS 1.2 at least with forward-secret AEAD ciphers only, ALPN
ignored, reloaded when either file changes so a renewed certificate takes
effect without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.ssl import AcceptableCiphers, Certificate, CertificateOptions, PrivateCertificate, TLSVersion
from twisted.logger import Logger

log = Logger()


class TLSFilesError(Exception):
    """
    The certificate or key cannot be used; ``str()`` names the file.
    """


#: TLS 1.2 suites: ECDHE key exchange, AEAD only (TLS 1.3's are all so)
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_PEM_END = b"-----END CERTIFICATE-----"


def _ignore_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """
    SMTP has no ALPN protocol: a client that offers some (a library's
    default, ``h2``) is answered without one (RFC 7301 3.2 lets a server
    ignore it), not with Twisted's internal_error alert.
    """
    return SSL.NO_OVERLAPPING_PROTOCOLS


class ServerTLSOptions(CertificateOptions):
    """
    ``CertificateOptions`` whose contexts ignore ALPN.
    """

    _alpn_ignored = False

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        if not self._alpn_ignored:
            context.set_alpn_select_callback(_ignore_alpn)
            self._alpn_ignored = True
        return context


def load_options(certificate: Path, key: Path) -> CertificateOptions:
    """
    TLS options from a PEM certificate file (the server's certificate first,
    then its intermediates, all sent to the client, as in a fullchain.pem)
    and a PEM key file.
    """
    try:
        chain = certificate.read_bytes()
        private = key.read_bytes()
    except OSError as e:
        raise TLSFilesError(f"{e.filename}: {e.strerror}") from None
    try:
        pem = PrivateCertificate.loadPEM(chain + b"\n" + private)
    except Exception as e:
        raise TLSFilesError(f"{certificate} / {key}: not a PEM certificate and matching key ({e})") from None
    try:
        blocks = [b + _PEM_END for b in chain.split(_PEM_END) if b"-----BEGIN CERTIFICATE-----" in b]
        intermediates = [Certificate.loadPEM(b).original for b in blocks[1:]]
    except Exception as e:
        raise TLSFilesError(f"{certificate}: a certificate after the first is not PEM ({e})") from None
    return ServerTLSOptions(
        privateKey=pem.privateKey.original,
        certificate=pem.original,
        extraCertChain=intermediates,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
    )


class ReloadingTLS:
    """
    Hands out the current TLS options, reloading them when the certificate
    or key file has changed since they were loaded.
    """

    def __init__(self, certificate: Path, key: Path) -> None:
        self.certificate = certificate
        self.key = key
        self._stamp = self._mtimes()
        self._options = load_options(certificate, key)

    def _mtimes(self) -> tuple[float, float]:
        try:
            return (self.certificate.stat().st_mtime, self.key.stat().st_mtime)
        except OSError:
            return (0.0, 0.0)

    def options(self) -> CertificateOptions:
        stamp = self._mtimes()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._options = load_options(self.certificate, self.key)
                log.info("TLS certificate reloaded from {path}", path=str(self.certificate))
            except TLSFilesError as e:
                log.error("TLS certificate not reloaded, keeping the previous one: {why}", why=str(e))
        return self._options


def describe(handle: object) -> str | None:
    """
    ``TLSv1.3:TLS_AES_256_GCM_SHA384`` for a TLS connection's handle, else ``None``.
    """
    if isinstance(handle, SSL.Connection):
        return f"{handle.get_protocol_version_name()}:{handle.get_cipher_name()}"
    return None


def client_tls_factory(ca_file: Path | None) -> Callable[[str, str], object]:
    """
    Outbound TLS options by policy: ``verify`` checks the chain (against
    ``ca_file``, else the system's roots) and the name with service-identity;
    the other policies encrypt without checking, as opportunistic SMTP does.
    """
    from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates

    trust: Any  # an IOpenSSLTrustRoot
    if ca_file is not None:
        blocks = ca_file.read_bytes().split(b"-----END CERTIFICATE-----")
        certificates = [Certificate.loadPEM(b + b"-----END CERTIFICATE-----") for b in blocks if b.strip()]
        trust = trustRootFromCertificates(certificates)
    else:
        trust = platformTrust()
    unverified = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2)

    def options(name: str, mode: str) -> object:
        if mode == "verify":
            return optionsForClientTLS(
                name, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
            )
        return unverified

    return options
