"""Development TLS material for the fal listeners: a private CA, a server certificate, and a client trust bundle.

fal-client hard-codes ``https://`` for ``FAL_RUN_HOST`` / ``FAL_QUEUE_RUN_HOST`` (api-compat.md §3.1), so a local
server needs a certificate its clients trust. :func:`init_tls` writes, into one folder:

* ``ca.pem``: a fresh CA certificate. Its private key is never written: the CA signs this one server certificate
  and can sign nothing else afterwards, so leaking the folder cannot mint certificates for other names.
* ``server.pem`` / ``server-key.pem``: the certificate (SANs: the given host names and IP addresses) and its key
  (mode 0600), for ``magi-server serve --tls-cert server.pem --tls-key server-key.pem``.
* ``bundle.pem``: certifi's public CAs (when certifi is installed) plus ``ca.pem``, for ``SSL_CERT_FILE`` in client
  processes. ``SSL_CERT_FILE`` replaces the default bundle, so the public CAs keep other https calls working.

Optional: it needs the ``cryptography`` package, imported only when called, so the server runs without it.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    bundle: Path

    def client_env(self, queue_host: str, run_host: str, key: str = "<your key>") -> dict[str, str]:
        """The variables a fal-client process needs (set before ``import fal_client``: it reads them then)."""
        return {"FAL_KEY": key, "FAL_QUEUE_RUN_HOST": queue_host, "FAL_RUN_HOST": run_host,
                "SSL_CERT_FILE": str(self.bundle)}


def init_tls(directory: str | os.PathLike, hosts: tuple[str, ...] = DEFAULT_HOSTS, *, days: int = 825,
             include_public_cas: bool = True) -> TLSFiles:
    """Create the CA, the server certificate for ``hosts`` and the trust bundle in ``directory``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise RuntimeError("creating certificates needs the 'cryptography' package (pip install cryptography), "
                           "or bring your own certificate and key") from None
    if not hosts:
        raise ValueError("give at least one host name or IP address")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(minutes=5)  # tolerate small clock differences between machines
    # 825 days: the longest validity Apple's TLS clients accept for a server certificate
    end = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "magi-server local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    files = TLSFiles(ca_cert=out / "ca.pem", server_cert=out / "server.pem", server_key=out / "server-key.pem",
                     bundle=out / "bundle.pem")
    ca_pem = ca_cert.public_bytes(pem)
    files.ca_cert.write_bytes(ca_pem)
    files.server_cert.write_bytes(cert.public_bytes(pem))
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    files.server_key.unlink(missing_ok=True)
    # created owner-only, never world-readable even for an instant
    fd = os.open(files.server_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    public = b""
    if include_public_cas:
        try:
            import certifi

            public = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n"
        except ImportError:
            public = b""
    files.bundle.write_bytes(public + ca_pem)
    return files
