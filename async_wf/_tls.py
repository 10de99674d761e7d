"""TLS bound to the token: ``ssl="auto"``, one option instead of a PKI.

The token handshake proves that both ends know the secret, but it is not
bound to the connection: a relay in the middle can pass it through and
then read or inject frames. TLS closes that hole once the worker can tell
the real scheduler's certificate from a relay's. Here both ends derive the
same P-256 key pair from the token (HKDF-SHA256, then the scalar modulo the
group order): the scheduler serves a self-signed certificate for that key,
and a worker accepts a server only if its certificate carries that public
key. Whoever can present it knows the token; a relay without it cannot
finish the TLS handshake. The workers need nothing but the token file they
already have.

Needs the ``cryptography`` package (the ``[tls]`` extra) on both ends.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import ssl
import tempfile
from typing import Any

#: what the derived key is for, so the same token gives other keys elsewhere
_INFO = b"async_wf tls key v1"
# the order of the P-256 group
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class TlsPinError(ssl.SSLError):
    """The scheduler's certificate does not carry the key derived from the token."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise RuntimeError(
            "ssl='auto' needs the 'cryptography' package on the scheduler and the workers: "
            "pip install 'async_wf[tls]' (or pip install cryptography)"
        ) from None
    return ec


def _hkdf(secret: bytes, length: int = 48) -> bytes:
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + _INFO + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def token_key(secret: bytes) -> Any:
    """The P-256 private key both ends derive from ``secret``."""
    ec = _crypto()
    # 48 bytes reduced modulo n: the bias is below 2**-128
    scalar = int.from_bytes(_hkdf(secret), "big") % (_P256_N - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def server_context(secret: bytes) -> ssl.SSLContext:
    """A server context with a self-signed certificate for the token's key."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = token_key(secret)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "async_wf scheduler")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain takes files only: a private directory, removed at once
    with tempfile.TemporaryDirectory(prefix="async_wf-tls-") as d:
        path = os.path.join(d, "cert.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        ctx.load_cert_chain(path)
    return ctx


def client_context() -> ssl.SSLContext:
    """A client context that encrypts and leaves the check of the server to ``check_server``.

    No CA can vouch for a token-derived certificate; the pin is checked on
    the connection as soon as the handshake is done, before any frame.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_server(ssl_object: Any, secret: bytes) -> None:
    """Raise ``TlsPinError`` unless the peer's certificate has the token's public key."""
    from cryptography import x509

    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise TlsPinError("the scheduler presented no TLS certificate (is it running "
                          "with ssl='auto'?)")
    got = _public_der(x509.load_der_x509_certificate(der).public_key())
    if not hmac.compare_digest(got, _public_der(token_key(secret).public_key())):
        raise TlsPinError("the scheduler's TLS certificate is not the one derived from the "
                          "token: a relay, or a scheduler with another token")
