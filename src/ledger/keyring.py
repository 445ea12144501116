"""Per-customer encryption of personal data (crypto-shredding).

Each customer gets a random 256-bit data key. It is stored wrapped
(AES-256-GCM) by the master key, with the customer id as associated data so
a wrapped key cannot be moved to another customer. Personal fields of an
event are encrypted with AES-256-GCM under the data key, the event id as
associated data. ``forget`` deletes the wrapped key: the ciphertext in the
ledger stays (the chain still verifies) but can never be read again.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE = 12


class KeyError_(RuntimeError):
    """The master key is missing, malformed or not the one the ledger was written with."""


def load_master_key(configured: str | None, key_file: Path) -> bytes:
    """The master key from the setting, else from ``key_file`` (created 0600 on first use)."""
    if configured:
        return _decode_key(configured, "LEDGER_MASTER_KEY")
    if key_file.exists():
        return _decode_key(key_file.read_text().strip(), str(key_file))
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(key).decode() + "\n")
    return key


def _decode_key(text: str, where: str) -> bytes:
    raw: bytes | None = None
    if len(text) == 64:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error:
            raw = None
    if raw is None or len(raw) != 32:
        raise KeyError_(
            f"{where}: expected 32 random bytes as base64 (44 characters) or hex (64), "
            f"got {len(text)} characters"
        )
    return raw


class Keyring:
    """Wraps, unwraps and caches customer data keys; encrypts and decrypts personal data.

    The cache is a bounded LRU: an AESGCM object holds about 2.4 KB of native memory, so
    caching every customer of a large ledger would grow memory without bound (100k
    customers = 240 MB). A miss costs one unwrap (a few microseconds).
    """

    def __init__(self, master_key: bytes, capacity: int = 8192):
        self._master_key = master_key
        self._master = AESGCM(master_key)
        self._capacity = capacity
        # customer -> (the wrapped key the cipher came from, cipher). A cached cipher is
        # reused only for the same stored key, never after forget deleted and re-created it.
        self._cache: OrderedDict[str, tuple[bytes, AESGCM]] = OrderedDict()

    def __reduce__(self) -> tuple[type[Keyring], tuple[bytes, int]]:
        # Pickled for the projection runner's worker processes (same machine, same user):
        # the master key only, never the cache of unwrapped keys.
        return (Keyring, (self._master_key, self._capacity))

    def _remember(self, customer_id: str, wrapped: bytes, cipher: AESGCM) -> None:
        self._cache[customer_id] = (wrapped, cipher)
        self._cache.move_to_end(customer_id)
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)

    def new_wrapped_key(self, customer_id: str) -> tuple[bytes, AESGCM]:
        key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE)
        wrapped = nonce + self._master.encrypt(nonce, key, b"ledger-key:" + customer_id.encode())
        cipher = AESGCM(key)
        self._remember(customer_id, wrapped, cipher)
        return wrapped, cipher

    def load(self, customer_id: str, wrapped: bytes) -> AESGCM:
        hit = self._cache.get(customer_id)
        if hit is not None and hit[0] == wrapped:
            self._cache.move_to_end(customer_id)
            return hit[1]
        cipher = self.unwrap(customer_id, wrapped)
        self._remember(customer_id, bytes(wrapped), cipher)
        return cipher

    def unwrap(self, customer_id: str, wrapped: bytes) -> AESGCM:
        """The customer's cipher, not cached: for bulk readers that use each key once (a
        projection rebuild), where the LRU's bookkeeping would cost more than the unwrap."""
        try:
            key = self._master.decrypt(
                wrapped[:NONCE], wrapped[NONCE:], b"ledger-key:" + customer_id.encode()
            )
        except InvalidTag:
            raise KeyError_(
                "the master key does not unwrap this ledger's data keys: LEDGER_MASTER_KEY or "
                "master.key is not the key the ledger was written with"
            ) from None
        return AESGCM(key)

    def cached(self, customer_id: str) -> AESGCM | None:
        hit = self._cache.get(customer_id)
        return None if hit is None else hit[1]

    def drop(self, customer_id: str) -> None:
        self._cache.pop(customer_id, None)


def encrypt(cipher: AESGCM, nonce: bytes, plaintext: bytes, event_id: bytes) -> str:
    return base64.b64encode(nonce + cipher.encrypt(nonce, plaintext, event_id)).decode("ascii")


def decrypt(cipher: AESGCM, blob: str, event_id: bytes) -> bytes:
    raw = base64.b64decode(blob)
    return cipher.decrypt(raw[:NONCE], raw[NONCE:], event_id)
