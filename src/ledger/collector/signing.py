"""Webhook authenticity as the providers sign it, configured per source.

* **SendGrid Signed Event Webhook**: SendGrid signs ``timestamp + raw body`` with ECDSA
  over P-256 and SHA-256; the signature (base64 of DER) is in
  ``X-Twilio-Email-Event-Webhook-Signature``, the timestamp in
  ``X-Twilio-Email-Event-Webhook-Timestamp``. The source is configured with the
  *verification key* SendGrid shows (base64 of the DER public key, or PEM).
* **Twilio request validation**: ``X-Twilio-Signature`` is
  ``base64(HMAC-SHA1(auth token, URL + each form parameter's name and value, sorted by
  name))``, over the full URL Twilio requested. Behind a proxy that URL is not the one the
  collector sees, so a source can name its public base URL (``https://calls.example.com``);
  the path and query string are the request's. As Twilio's own validators do, the URL is
  tried without a port and with its port (or the scheme's default); with basic-auth
  credentials in the URL (``https://KEY:@host/…``, how the write key travels) it is tried
  with and without them.

A source with a key or token configured refuses a request to that provider's route without
a signature (401) or with one that does not verify (403), each with the reason. Secrets are
stored beside the write keys in ``collector_webhook_auth``: the Twilio auth token encrypted
with a key derived from the ledger's master key (AES-GCM; it must be usable, so it cannot be
hashed like a write key), the SendGrid public key as given (it is public). Neither is ever
printed back in full: ``ledger sources list`` shows a short hint.

A replayed request carrying an old valid signature stores nothing new: every event's id
derives from the provider's idempotency key (``sg_event_id``, ``CallSid``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger import keyring as kr
from ledger.collector.db import CollectorDB
from ledger.ledger import LedgerError
from ledger.settings import Settings

PROVIDERS = ("sendgrid", "twilio")
#: How long a running collector trusts a looked-up configuration (as write keys).
CACHE_SECONDS = 1.0
SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE = "X-Twilio-Signature"

TABLES = [
    """CREATE TABLE IF NOT EXISTS collector_webhook_auth (
        source TEXT NOT NULL,
        provider TEXT NOT NULL,
        secret TEXT NOT NULL,
        hint TEXT NOT NULL,
        public_url TEXT,
        set_at TEXT NOT NULL,
        PRIMARY KEY (source, provider)
    )""",
]


class SignatureRefused(Exception):
    """A request a source's signing configuration refuses: 401 (unsigned) or 403 (bad)."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


# --------------------------------------------------------------------------- the algorithms


def load_sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key: base64 of the DER public key (as shown), or PEM."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error, UnicodeEncodeError):
        raise LedgerError(
            "--sendgrid-key: not a public key; expected the Verification Key SendGrid shows "
            "under Mail Settings > Signed Event Webhook (base64, starting MFkw...)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise LedgerError(
            "--sendgrid-key: expected an ECDSA P-256 public key, as SendGrid's verification key is"
        )
    return key


@functools.lru_cache(maxsize=64)
def _sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    return load_sendgrid_key(text)


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey, body: bytes, signature: str | None, timestamp: str | None
) -> None:
    """Raise :class:`SignatureRefused` unless ``signature`` signs ``timestamp + body``."""
    if not signature or not timestamp:
        missing = SENDGRID_SIGNATURE if not signature else SENDGRID_TIMESTAMP
        raise SignatureRefused(
            401,
            f"{missing}: missing; this source accepts only SendGrid's signed event webhook "
            "requests",
        )
    try:
        der = base64.b64decode(signature.strip(), validate=True)
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureRefused(
            403,
            f"{SENDGRID_SIGNATURE}: does not verify with the source's SendGrid verification "
            "key over the timestamp and the body as received",
        ) from None


def twilio_signature(token: str, url: str, params: Mapping[str, Sequence[str]]) -> str:
    """Twilio's X-Twilio-Signature of a form-encoded request to ``url``."""
    text = url + "".join(
        name + value for name in sorted(params) for value in sorted(set(params[name]))
    )
    return base64.b64encode(hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()).decode()


def twilio_urls(url: str, userinfo: str | None = None) -> list[str]:
    """The forms of ``url`` Twilio may have signed: without a port and with its port (the
    scheme's default when none is given), as Twilio's validators try; given the request's
    basic-auth ``user:password``, each also with the credentials in the URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    ports = ["", f":{parts.port or default}"]
    creds = [""] + ([f"{userinfo}@"] if userinfo else [])
    return [
        urlunsplit((parts.scheme, cred + host + port, parts.path, parts.query, ""))
        for cred in creds
        for port in ports
    ]


def verify_twilio(
    token: str,
    urls: Iterable[str],
    params: Mapping[str, Sequence[str]],
    signature: str | None,
) -> None:
    """Raise :class:`SignatureRefused` unless ``signature`` is Twilio's for one of ``urls``."""
    if not signature:
        raise SignatureRefused(
            401, f"{TWILIO_SIGNATURE}: missing; this source accepts only requests Twilio signed"
        )
    tried = list(urls)
    given = signature.strip().encode()
    if any(hmac.compare_digest(twilio_signature(token, u, params).encode(), given) for u in tried):
        return
    shown = urlsplit(tried[0])._replace(netloc=urlsplit(tried[0]).netloc.rsplit("@", 1)[-1])
    raise SignatureRefused(
        403,
        f"{TWILIO_SIGNATURE}: does not match the source's Twilio auth token over "
        f"{urlunsplit(shown)} and the form parameters; if Twilio calls the collector through "
        "a proxy, set the public URL with `ledger sources signing NAME --public-url`",
    )


# --------------------------------------------------------------------------- the configuration


@dataclass(frozen=True)
class SigningConfig:
    """What one source requires of one provider's requests."""

    source: str
    provider: str
    hint: str
    public_url: str | None
    set_at: str
    #: The SendGrid public key, or the Twilio auth token (decrypted); not for display.
    secret: str


def master_key(settings: Settings) -> bytes:
    """The ledger's master key (the secrets' key derives from it); a sentence when missing."""
    try:
        return kr.load_master_key(settings.master_key, settings.key_file)
    except (kr.KeyError_, ValueError) as exc:
        raise LedgerError(str(exc)) from None


def _secrets_key(master_key: bytes) -> AESGCM:
    return AESGCM(hmac.new(master_key, b"ledger collector webhook secrets v1", "sha256").digest())


class WebhookSigning:
    """The ``collector_webhook_auth`` table: set, clear, list, and look up per request."""

    def __init__(self, db: CollectorDB, master_key: bytes | None):
        """``master_key`` None: only :meth:`hints` and :meth:`clear` (nothing to decrypt)."""
        self.db = db
        self._cipher = _secrets_key(master_key) if master_key is not None else None
        db.create(TABLES)
        self._cache: dict[tuple[str, str], tuple[float, SigningConfig | None]] = {}
        self._lock = threading.Lock()

    def _seal(self, source: str, provider: str, secret: str) -> str:
        assert self._cipher is not None, "opened without the master key"
        nonce = os.urandom(12)
        sealed = self._cipher.encrypt(nonce, secret.encode(), f"{source}\n{provider}".encode())
        return base64.b64encode(nonce + sealed).decode()

    def _open(self, source: str, provider: str, stored: str) -> str:
        assert self._cipher is not None, "opened without the master key"
        blob = base64.b64decode(stored)
        return self._cipher.decrypt(blob[:12], blob[12:], f"{source}\n{provider}".encode()).decode()

    def set_sendgrid(self, source: str, public_key: str) -> SigningConfig:
        key = load_sendgrid_key(public_key)
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        text = base64.b64encode(der).decode()
        hint = f"P-256 key sha256:{hashlib.sha256(der).hexdigest()[:12]}"
        return self._put(source, "sendgrid", text, hint, None)

    def set_twilio(self, source: str, token: str, public_url: str | None) -> SigningConfig:
        token = token.strip()
        if not token or not token.isprintable() or len(token) > 200:
            raise LedgerError(
                "--twilio-token: expected the account's Auth Token (as in the Twilio Console)"
            )
        url = _public_url(public_url)
        hint = f"auth token {token[:4]}… ({len(token)} characters)"
        return self._put(source, "twilio", self._seal(source, "twilio", token), hint, url)

    def set_public_url(self, source: str, public_url: str | None) -> SigningConfig:
        current = self.get(source, "twilio", cached=False)
        if current is None:
            raise LedgerError(
                f"--public-url: source {source!r} has no Twilio auth token; set one with "
                "--twilio-token (the URL is what Twilio signs)"
            )
        return self.set_twilio(source, current.secret, public_url)

    def _put(
        self, source: str, provider: str, secret: str, hint: str, public_url: str | None
    ) -> SigningConfig:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.db.transaction():
            known = self.db.query("SELECT 1 FROM collector_sources WHERE name = ?", [source])
            if not known:
                raise LedgerError(f"no source named {source!r}; add it with `ledger sources add`")
            self.db.execute(
                "DELETE FROM collector_webhook_auth WHERE source = ? AND provider = ?",
                [source, provider],
            )
            self.db.execute(
                "INSERT INTO collector_webhook_auth (source, provider, secret, hint, public_url, "
                "set_at) VALUES (?, ?, ?, ?, ?, ?)",
                [source, provider, secret, hint, public_url, now],
            )
        config = self.get(source, provider, cached=False)
        assert config is not None
        return config

    def clear(self, source: str, provider: str) -> bool:
        if provider not in PROVIDERS:
            raise LedgerError(f"--clear {provider!r}: expected one of {', '.join(PROVIDERS)}")
        with self.db.transaction():
            removed = self.db.execute(
                "DELETE FROM collector_webhook_auth WHERE source = ? AND provider = ?",
                [source, provider],
            )
        return removed > 0

    def get(self, source: str, provider: str, *, cached: bool = True) -> SigningConfig | None:
        """The source's configuration for ``provider``; a change shows within a second."""
        now = time.monotonic()
        if cached:
            with self._lock:
                hit = self._cache.get((source, provider))
            if hit is not None and now - hit[0] < CACHE_SECONDS:
                return hit[1]
        rows = self.db.query(
            "SELECT secret, hint, public_url, set_at FROM collector_webhook_auth "
            "WHERE source = ? AND provider = ?",
            [source, provider],
        )
        config = None
        if rows:
            secret, hint, url, set_at = rows[0]
            if provider == "twilio":
                try:
                    secret = self._open(source, provider, secret)
                except (InvalidTag, ValueError, binascii.Error):
                    raise LedgerError(
                        f"the Twilio auth token of source {source!r} cannot be decrypted (stored "
                        "under another master key, or altered); set it again with `ledger "
                        "sources signing`"
                    ) from None
            config = SigningConfig(source, provider, hint, url, set_at, secret)
        with self._lock:
            self._cache[(source, provider)] = (now, config)
        return config

    def hints(self) -> dict[str, list[str]]:
        """Per source, what ``ledger sources list`` shows: provider, hint, public URL."""
        out: dict[str, list[str]] = {}
        for source, provider, hint, url in self.db.query(
            "SELECT source, provider, hint, public_url FROM collector_webhook_auth "
            "ORDER BY source, provider"
        ):
            out.setdefault(source, []).append(f"{provider}: {hint}" + (f" at {url}" if url else ""))
        return out

    # ------------------------------------------------------------------ per request

    def check_sendgrid(self, source: str, body: bytes, headers: Mapping[str, str]) -> None:
        config = self.get(source, "sendgrid")
        if config is None:
            return
        verify_sendgrid(
            _sendgrid_key(config.secret),
            body,
            headers.get(SENDGRID_SIGNATURE.lower()),
            headers.get(SENDGRID_TIMESTAMP.lower()),
        )

    def check_twilio(
        self,
        source: str,
        url: str,
        params: Mapping[str, Sequence[str]],
        headers: Mapping[str, str],
        userinfo: str | None,
    ) -> None:
        config = self.get(source, "twilio")
        if config is None:
            return
        if config.public_url:
            parts = urlsplit(url)
            url = config.public_url + parts.path + (f"?{parts.query}" if parts.query else "")
        verify_twilio(
            config.secret,
            twilio_urls(url, userinfo),
            params,
            headers.get(TWILIO_SIGNATURE.lower()),
        )


def _public_url(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    parts = urlsplit(value.strip())
    bad = parts.query or parts.fragment or "@" in parts.netloc
    if parts.scheme not in ("http", "https") or not parts.hostname or bad:
        raise LedgerError(
            f"--public-url {value!r}: expected the collector's base URL as Twilio calls it, "
            "such as https://collector.example.com (no credentials, no query string)"
        )
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
