"""Hash chaining: how one stored event is sealed to its predecessor.

A stored event's bytes are ``{"event":<body>,"hash":"<hex>"}`` where ``body``
is the canonical JSON of the event (sorted keys, no whitespace, personal
fields already encrypted) and includes ``prev_hash``, the hash of the previous
event of the same customer (:data:`GENESIS` for the first). The hash is
``sha256(prev_hash || body)``. Because the hash covers ciphertext, destroying a
customer's key later leaves every chain verifiable.
"""

from __future__ import annotations

from hashlib import sha256

GENESIS = "0" * 64
_PREFIX = b'{"event":'
_SUFFIX_LEN = len(b',"hash":"') + 64 + len(b'"}')


class SealError(ValueError):
    """The stored bytes are not a sealed event."""


def seal(body: bytes, prev_hash: str) -> tuple[bytes, str]:
    """Return the stored bytes for ``body`` and its hash."""
    digest = sha256(prev_hash.encode("ascii") + body).hexdigest()
    return b"".join((_PREFIX, body, b',"hash":"', digest.encode("ascii"), b'"}')), digest


def unseal(state: bytes) -> tuple[bytes, str]:
    """Split stored bytes into (body, recorded hash) without parsing the JSON."""
    if not state.startswith(_PREFIX) or not state.endswith(b'"}') or len(state) < 80:
        raise SealError("not a sealed event")
    body = state[len(_PREFIX) : -_SUFFIX_LEN]
    tail = state[-_SUFFIX_LEN:]
    if not tail.startswith(b',"hash":"'):
        raise SealError("not a sealed event")
    return body, tail[9:73].decode("ascii", errors="replace")


def chain_hash(prev_hash: str, body: bytes) -> str:
    return sha256(prev_hash.encode("ascii") + body).hexdigest()
