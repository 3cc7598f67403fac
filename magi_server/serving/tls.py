"""Development TLS material for the fal listeners: a private CA, a server certificate, and a client trust bundle.

fal-client hard-codes ``https://`` for ``FAL_RUN_HOST`` / ``FAL_QUEUE_RUN_HOST`` (api-compat.md §3.1), so a local
server needs a certificate its clients trust. :func:`init_tls` writes, into one folder:

* ``ca.pem``: a fresh CA certificate. Its private key is never written: the CA signs this one server certificate
  and can sign nothing else afterwards, so leaking the folder cannot mint certificates for other names.
* ``server.pem`` / ``server-key.pem``: the certificate (SANs: the given host names and IP addresses) and its key
  (mode 0600), for ``magi-server serve --tls-cert server.pem --tls-key server-key.pem``.
* ``bundle.pem``: certifi's public CAs (when certifi is installed) plus ``ca.pem``, for ``SSL_CERT_FILE`` in client
  processes. ``SSL_CERT_FILE`` replaces the default bundle, so the public CAs keep other https calls working.

The certificates are made by trustme (the ``tls`` extra: ``pip install 'magi-server[tls]'``), imported only when
called, so the server runs without it.
"""
from __future__ import annotations

import datetime
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
        import trustme
    except ImportError:
        raise RuntimeError("creating certificates needs trustme (pip install 'magi-server[tls]'), "
                           "or bring your own certificate and key") from None
    if not hosts:
        raise ValueError("give at least one host name or IP address")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = trustme.CA(organization_name="magi-server", organization_unit_name="magi-server local CA")
    # 825 days: the longest validity Apple's TLS clients accept for a server certificate; starting 5 minutes ago
    # tolerates small clock differences between machines
    leaf = ca.issue_cert(*hosts, common_name=hosts[0], not_before=now - datetime.timedelta(minutes=5),
                         not_after=now + datetime.timedelta(days=days))

    files = TLSFiles(ca_cert=out / "ca.pem", server_cert=out / "server.pem", server_key=out / "server-key.pem",
                     bundle=out / "bundle.pem")
    ca_pem = ca.cert_pem.bytes()
    files.ca_cert.write_bytes(ca_pem)
    files.server_cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    files.server_key.unlink(missing_ok=True)
    # created owner-only, never world-readable even for an instant
    fd = os.open(files.server_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(leaf.private_key_pem.bytes())
    public = b""
    if include_public_cas:
        try:
            import certifi

            public = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n"
        except ImportError:
            public = b""
    files.bundle.write_bytes(public + ca_pem)
    return files
