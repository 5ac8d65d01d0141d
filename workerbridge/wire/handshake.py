"""The Gateway handshake: the Worker and the Gateway prove the job's secret to each other.

Covers: fresh nonces and the two HMAC-SHA256 proofs.  The secret itself never
crosses the network; a listener that is not the Gateway sees only a nonce and a
proof bound to the nonce it chose, and learns nothing it could replay.  Does
not cover: the frames that carry them (``protocol``), the server (``gateway``)
or the client (``logs``).  Lines after the handshake are not encrypted.

Order on one connection::

    gateway -> HELLO    {"nonce": g}                   a fresh random nonce
    worker  -> AUTH     {"nonce": w, "proof": HMAC(secret, "worker"  | g | w)}
    gateway -> WELCOME  {"proof": HMAC(secret, "gateway" | g | w)}
    (the Worker checks that proof before it sends any line)

>>> g, w = new_nonce(), new_nonce()
>>> check(proof("s", "worker", g, w), "s", "worker", g, w)
True
>>> check(proof("s", "worker", g, w), "s", "gateway", g, w)
False
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32
ROLES = ("worker", "gateway")


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def proof(secret: str, role: str, gateway_nonce: str, worker_nonce: str) -> str:
    """What ``role`` sends to show it holds ``secret``, bound to both nonces."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    message = "|".join((role, gateway_nonce, worker_nonce)).encode("ascii")
    return hmac.new(secret.encode("ascii"), message, hashlib.sha256).hexdigest()


def check(got: object, secret: str, role: str, gateway_nonce: str, worker_nonce: str) -> bool:
    """Whether ``got`` is ``role``'s proof (constant-time compare)."""
    if not isinstance(got, str) or not got.isascii():
        return False
    want = proof(secret, role, gateway_nonce, worker_nonce)
    return hmac.compare_digest(got.encode("ascii"), want.encode("ascii"))


def valid_nonce(value: object) -> bool:
    """A nonce as :func:`new_nonce` makes them (hex, full length)."""
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True
