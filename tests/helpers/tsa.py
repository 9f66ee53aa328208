"""A local RFC 3161 timestamp authority for tests (issue 15, item 4): a throwaway CA and a
TSA certificate (extendedKeyUsage critical timeStamping) made with ``cryptography`` in a
temp dir, OpenSSL's own ``openssl ts -reply`` signing each request, behind a tiny
http.server on 127.0.0.1 (port 0) in a thread that lives as long as its ``with`` block.
No test reaches the internet.

``LocalTSA.failing`` makes it answer 503 (a TSA that is up but failing); a URL where
nothing listens is ``closed_url()``."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CONFIG = """\
[ tsa ]
default_tsa = tsa_config1

[ tsa_config1 ]
dir = {dir}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.pem
certs = $dir/ca.pem
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.3.6.1.4.1.99999.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(d: Path, label: str = "memdump test") -> Path:
    """A CA (``ca.pem``) and a TSA key and certificate it issued (``tsa.key``,
    ``tsa.pem``) and an ``openssl ts`` config in ``d``; returns the config's path."""
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    tsa_key = ec.generate_private_key(ec.SECP256R1())
    tsa = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} TSA"))
        .issuer_name(ca.subject)
        .public_key(tsa_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "tsa.pem").write_bytes(tsa.public_bytes(serialization.Encoding.PEM))
    (d / "tsa.key").write_bytes(_pem_key(tsa_key))
    (d / "tsa.key").chmod(0o600)
    (d / "serial").write_text("01\n")
    cfg = d / "tsa.cnf"
    cfg.write_text(_CONFIG.format(dir=d))
    return cfg


def reply(cfg: Path, query: bytes, work: Path) -> bytes:
    """OpenSSL's TimeStampResp to the DER TimeStampReq ``query``."""
    q, r = work / "query.tsq", work / "reply.tsr"
    q.write_bytes(query)
    r.unlink(missing_ok=True)
    subprocess.run(
        ["openssl", "ts", "-reply", "-config", str(cfg), "-queryfile", str(q), "-out", str(r)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return r.read_bytes()


@dataclass
class LocalTSA:
    url: str
    ca: Path  # the CA certificate its TSA certificate chains to (PEM)
    dir: Path
    requests: int = 0
    failing: bool = False


@contextmanager
def local_tsa(d: Path, label: str = "memdump test") -> Iterator[LocalTSA]:
    """A TSA at ``LocalTSA.url`` (http://127.0.0.1:<port>/tsa) until the block ends."""
    cfg = make_pki(d, label)
    lock = threading.Lock()
    state = LocalTSA("", d / "ca.pem", d)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 16))
            with lock:
                state.requests += 1
                if state.failing or self.headers.get("Content-Type") != (
                    "application/timestamp-query"
                ):
                    self.send_error(503)
                    return
                answer = reply(cfg, body, d)
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/tsa"
    thread = threading.Thread(target=server.serve_forever, name="local-tsa", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_url() -> str:
    """A loopback URL where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/tsa"
