"""TLS material checked in the master, the way uvicorn will load it in every worker.

uvicorn builds its context in each worker (`uvicorn.config.create_ssl_context`); a key
that does not load there is a crash loop with a traceback. Here the same steps run once,
before any worker exists, and a failure names the setting that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings


@dataclass(frozen=True)
class Problem:
    message: str
    fields: tuple[str, ...]  # the setting at fault first, then the ones it is judged with


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc).replace("_", " ").lower()


def check(s: Settings) -> Problem | None:
    """The steps of uvicorn's create_ssl_context, one setting at a time."""
    import ssl  # here: most masters serve plain HTTP behind a proxy, and this is their start

    assert s.ssl_certfile and s.ssl_keyfile
    try:
        ctx = ssl.SSLContext(s.ssl_version)
    except ValueError:
        return Problem(
            "not a TLS protocol this Python supports (17 = TLS server)", ("ssl_version",)
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=s.ssl_certfile)
    except (ssl.SSLError, OSError) as exc:
        return Problem(f"no certificate in PEM format ({_reason(exc)})", ("ssl_certfile",))
    with open(s.ssl_keyfile, "rb") as fh:
        key = fh.read()
    if b"PRIVATE KEY-----" not in key:
        return Problem("no private key in PEM format", ("ssl_keyfile",))
    encrypted = b"ENCRYPTED" in key
    if encrypted and not s.ssl_keyfile_password:
        return Problem("the key is encrypted: set --ssl-keyfile-password", ("ssl_keyfile",))
    password = s.ssl_keyfile_password or ""
    try:
        # A callable, never None: OpenSSL would otherwise ask for a pass phrase on the tty.
        ctx.load_cert_chain(s.ssl_certfile, s.ssl_keyfile, lambda: password)
    except (ssl.SSLError, OSError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            return Problem(
                "the key does not belong to the certificate", ("ssl_keyfile", "ssl_certfile")
            )
        if encrypted:
            return Problem("does not decrypt the key", ("ssl_keyfile_password", "ssl_keyfile"))
        return Problem(f"cannot load the key ({_reason(exc)})", ("ssl_keyfile",))
    try:
        ctx.verify_mode = ssl.VerifyMode(s.ssl_cert_reqs)
    except ValueError:
        return Problem("expected 0 (none), 1 (optional) or 2 (required)", ("ssl_cert_reqs",))
    if s.ssl_ca_certs:
        try:
            ctx.load_verify_locations(s.ssl_ca_certs)
        except (ssl.SSLError, OSError) as exc:
            return Problem(f"no CA certificates in it ({_reason(exc)})", ("ssl_ca_certs",))
    if s.ssl_ciphers:
        try:
            ctx.set_ciphers(s.ssl_ciphers)
        except ssl.SSLError:
            return Problem("no cipher of this OpenSSL matches", ("ssl_ciphers",))
    return None
