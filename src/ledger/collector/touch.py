"""A touchpoint on its way in: a contract event still missing its customer, plus who it names.

Mappers (Segment calls, provider webhooks) produce :class:`Touch` es; the
identity resolver fills in ``customer_id`` from ``identifiers``; the ledger
validates and appends. Identifier values are normalised here, once, so the
graph and the stored envelope agree on what "the same email" means.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

#: Namespace of the collector's deterministic event ids: uuid5(NS, "source\\nmessage id").
EVENT_NAMESPACE = uuid.UUID("6f1c0b7e-2d55-5d0e-9a43-1c9d0f6b8a11")
#: Identifier kinds the identity graph links, strongest first (the order ties are broken in).
IDENTIFIER_KINDS = ("user_id", "email", "phone", "social_handle", "anonymous_id")
_NS_BYTES = EVENT_NAMESPACE.bytes
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


class MappingError(ValueError):
    """What a channel sent cannot become a contract event; one sentence per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class Touch:
    """One event to append once its customer is known."""

    event: dict[str, Any]
    #: (kind, normalised value) pairs the identity graph links and resolves.
    ids: list[tuple[str, str]] = field(default_factory=list)
    #: The raw message it came from, for the dead-letter file if the contract rejects it.
    raw: bytes | None = None


def event_id(source: str, message_id: str, part: str = "") -> str:
    """Deterministic: a retried message maps to the same event id, so it is stored once.

    This is ``str(uuid.uuid5(EVENT_NAMESPACE, ...))``, computed without the UUID class,
    which costs more than the hash on the collector's per-event path.
    """
    h = hashlib.sha1(_NS_BYTES + f"{source}\n{message_id}\n{part}".encode()).hexdigest()
    # Version 5 in the 13th hex digit, the RFC 4122 variant in the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def normalise_email(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    return email if re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email) else None


def normalise_phone(value: Any) -> str | None:
    """E.164 (``+`` and 7-15 digits); national numbers without a country code are not guessed."""
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = re.sub(r"[\s().\-/]", "", value.strip())
    if text.startswith("00"):
        text = "+" + text[2:]
    return text if re.fullmatch(r"\+[1-9][0-9]{6,14}", text) else None


def normalise_handle(value: Any, network: str | None = None) -> str | None:
    """``network:handle`` in lower case without the ``@``: handles are unique per network."""
    if not isinstance(value, str) or not value.strip():
        return None
    handle = value.strip().lstrip("@").lower()
    if not handle or len(handle) > 150:
        return None
    return f"{network}:{handle}" if network else handle


def plain_id(value: Any) -> str | None:
    """Segment ids may be strings or numbers; empty means absent."""
    if value.__class__ is str:  # the usual case first
        text = value.strip()
        return text[:200] if text else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text[:200] if text else None


def identifiers_of(
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    social_handle: str | None = None,
    name: Any = None,
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The envelope's ``identifiers`` and the graph's (kind, value) pairs for one touch."""
    envelope: dict[str, str] = {}
    found = {
        "user_id": user_id,
        "email": email,
        "phone": phone,
        "social_handle": social_handle,
        "anonymous_id": anonymous_id,
    }
    ids = [(k, v) for k, v in found.items() if v]
    envelope.update({k: v for k, v in found.items() if v})
    if isinstance(name, str) and name.strip():
        envelope["name"] = name.strip()[:200]
    return envelope, ids


def parse_time(value: Any, field_name: str) -> dt.datetime | None:
    """An ISO 8601 time with a timezone (Segment's format), or None when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MappingError([f"{field_name}: expected an ISO 8601 time string, got {value!r}"])
    return _parse_iso(value, field_name)


@functools.lru_cache(maxsize=4096)
def _parse_iso(value: str, field_name: str) -> dt.datetime:
    # Cached: a batch's messages often share sentAt and timestamps to the millisecond.
    try:
        moment = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise MappingError(
            [f"{field_name}: {value[:60]!r} is not an ISO 8601 time such as 2026-03-01T12:00:00Z"]
        ) from None
    if moment.tzinfo is None:
        raise MappingError([f"{field_name}: {value[:60]!r} has no timezone; add Z or an offset"])
    return moment
