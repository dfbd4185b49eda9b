"""
The inbound TLS context for STARTTLS: certificate and key from files,
TLS 1.2 at least, reloaded when either file changes so a renewed
certificate takes effect without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions, PrivateCertificate, TLSVersion
from twisted.logger import Logger

log = Logger()


class TLSFilesError(Exception):
    """
    The certificate or key cannot be used; ``str()`` names the file.
    """


def load_options(certificate: Path, key: Path) -> CertificateOptions:
    try:
        chain = certificate.read_bytes()
        private = key.read_bytes()
    except OSError as e:
        raise TLSFilesError(f"{e.filename}: {e.strerror}") from None
    try:
        pem = PrivateCertificate.loadPEM(chain + b"\n" + private)
    except Exception as e:
        raise TLSFilesError(f"{certificate} / {key}: not a PEM certificate and matching key ({e})") from None
    return CertificateOptions(
        privateKey=pem.privateKey.original,
        certificate=pem.original,
        raiseMinimumTo=TLSVersion.TLSv1_2,
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
