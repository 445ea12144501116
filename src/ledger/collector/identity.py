"""Identity stitching: which customer a touchpoint is about.

Customer ids are pseudonyms derived from an identifier with a keyed hash
(HMAC-SHA256 under a key derived from the ledger's master key), so the same
first identifier always mints the same customer id, and the id reveals
nothing about the email or phone it came from.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from ledger import keyring as kr
from ledger.collector.touch import IDENTIFIER_KINDS, Touch
from ledger.ledger import LedgerError
from ledger.settings import Settings


def identity_key(settings: Settings) -> bytes:
    """The HMAC key of identifier hashes; derived so it changes with the master key."""
    try:
        master = kr.load_master_key(settings.master_key, settings.key_file)
    except (kr.KeyError_, ValueError) as exc:
        raise LedgerError(str(exc)) from None
    return hmac.new(master, b"ledger collector identity v1", hashlib.sha256).digest()


class Pseudonyms:
    """Keyed hashes of identifiers, and customer ids minted from them."""

    def __init__(self, key: bytes):
        self._key = key

    def digest(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\n{value}".encode(), hashlib.sha256).hexdigest()

    def customer_id(self, kind: str, value: str) -> str:
        return "cus_" + self.digest(kind, value)[:20]


def strongest(ids: list[tuple[str, str]]) -> tuple[str, str]:
    return min(ids, key=lambda kv: (IDENTIFIER_KINDS.index(kv[0]), kv[1]))


class DirectResolver:
    """No graph: each touch belongs to the customer minted from its strongest identifier."""

    def __init__(self, pseudonyms: Pseudonyms):
        self.pseudonyms = pseudonyms

    def resolve(self, touches: list[Touch]) -> list[dict[str, Any]]:
        for touch in touches:
            touch.event["customer_id"] = self.pseudonyms.customer_id(*strongest(touch.ids))
        return []

    def commit(self) -> None:
        return None

    def rollback(self) -> None:
        return None
