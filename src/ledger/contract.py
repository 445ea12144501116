"""The event contract: what a touchpoint must look like to enter the ledger.

Every event is an envelope (who, when, where from) plus a payload typed by the
event's ``type``. The models here are the single source of truth: the JSON
Schemas in ``schemas/`` are generated from them (``ledger schemas export``),
and every write path (SDK, CLI import, Kafka worker, HTTP collector) validates
through :func:`parse_event` / :func:`parse_line`.

Choices a user should know about:

* ``occurred_at`` must carry a timezone; it is normalised to UTC.
* ``channel`` must be the channel the ``type`` belongs to (:data:`CHANNEL_OF`).
* Money is ``{"amount": "19.99", "currency": "EUR"}``: the amount a decimal
  string (or an integer), never a binary float; the currency an ISO 4217 code.
* Unknown fields at the top level and in the payload: in strict mode they are
  rejected, naming each one; otherwise they are kept, encrypted, in the stored
  event's ``extra`` bag so nothing a producer sent is silently lost.
  ``identifiers`` and money objects are closed: an unknown field there is an error.
* An optional field sent as ``null`` counts as absent.
* An event is at most :data:`MAX_EVENT_BYTES` bytes of JSON.
* Fields marked personal (identifiers, names, message bodies, free text) are
  encrypted per customer by the ledger; see :data:`PERSONAL_FIELDS`.

CloudEvents 1.0 mapping (used by Kafka headers and adapters):
``id`` = event_id, ``source`` = source, ``type`` = ``com.ledger.<type>``,
``subject`` = customer_id, ``time`` = occurred_at, ``datacontenttype`` =
application/json, ``dataschema`` = ``schemas/<type>.schema.json``.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Annotated, Any, Literal, NotRequired, Union
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 32 * 1024
#: Events may arrive late, never from the future beyond clock skew.
MAX_FUTURE_SKEW = dt.timedelta(days=1)

Channel = Literal["web", "email", "chat", "call", "social", "commerce", "support", "system"]
CHANNELS: tuple[str, ...] = Channel.__args__  # type: ignore[attr-defined]

# Active ISO 4217 currency codes (2024 list, funds and precious metals left out).
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD
    BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB
    EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK
    JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA
    MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK
    PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN
    SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST
    XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()  # noqa: SIM905 - a word list reads better than 160 quoted strings
)


class ContractError(ValueError):
    """An event broke the contract. ``problems`` holds one sentence per broken field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


# --------------------------------------------------------------------------- field types


def _no_float(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError(
            f"got the binary float {value!r}; send money as a decimal string such as "
            f'"{value:.2f}" (or an integer) so no cent is lost'
        )
    return value


_AMOUNT_LIMIT = Decimal(10) ** 14


def _max_four_places(value: Decimal) -> Decimal:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -4:
        raise ValueError("expected a finite amount with at most 4 decimal places")
    # Projections hold money as DECIMAL(18,4); a larger amount would sit in the immutable
    # ledger forever yet project as NULL.
    if value >= _AMOUNT_LIMIT:
        raise ValueError("expected at most 14 digits before the decimal point")
    return value


def _iso_currency(value: str) -> str:
    if value not in ISO_4217:
        raise ValueError(f"expected an ISO 4217 currency code such as EUR or USD, got {value!r}")
    return value


Amount = Annotated[
    Decimal, BeforeValidator(_no_float), Field(ge=0), AfterValidator(_max_four_places)
]
Currency = Annotated[str, AfterValidator(_iso_currency)]
Text = Annotated[str, Field(max_length=16_000)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
CustomerId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$",
        description=(
            "A pseudonymous customer key (letters, digits, _ . : -). It is the stream key and "
            "is stored in the clear, so it must not be an email address or phone number."
        ),
    ),
]


_ALLOW = ConfigDict(extra="allow")
_FORBID = ConfigDict(extra="forbid")
Id = Annotated[str, Field(min_length=1, max_length=200)]
Url = Annotated[str, Field(min_length=1, max_length=2048)]


@with_config(_FORBID)
class Money(TypedDict):
    amount: Annotated[Amount, Field(description='Decimal string such as "19.99"; never a float.')]
    currency: Annotated[Currency, Field(description="ISO 4217 code, e.g. EUR.")]


@with_config(_FORBID)
class Identifiers(TypedDict, total=False):
    """Ways the channel knows the person. All of it is personal data (encrypted at rest)."""

    email: Annotated[str, Field(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None
    phone: (
        Annotated[
            str, Field(pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164, e.g. +4915112345678.")
        ]
        | None
    )
    anonymous_id: Annotated[str, Field(max_length=200)] | None
    user_id: Annotated[str, Field(max_length=200)] | None
    social_handle: Annotated[str, Field(max_length=200)] | None
    name: Name | None


# --------------------------------------------------------------------------- payloads
# Payloads allow unknown fields at validation time; the strictness decides what happens
# to them (rejected, or kept in the encrypted ``extra`` bag).


@with_config(_ALLOW)
class PageViewed(TypedDict):
    url: Url
    title: NotRequired[Annotated[str, Field(max_length=500)] | None]
    referrer: NotRequired[Annotated[str, Field(max_length=2048)] | None]
    duration_ms: NotRequired[Annotated[int, Field(ge=0, le=2**53)] | None]


@with_config(_ALLOW)
class FormSubmitted(TypedDict):
    form_id: Id
    url: NotRequired[Annotated[str, Field(max_length=2048)] | None]
    fields: NotRequired[
        Annotated[dict[str, Text], Field(description="What the person typed.")] | None
    ]


@with_config(_ALLOW)
class EmailSent(TypedDict):
    message_id: Id
    campaign_id: NotRequired[Id | None]
    subject: NotRequired[Annotated[str, Field(max_length=500)] | None]


@with_config(_ALLOW)
class EmailOpened(TypedDict):
    message_id: Id
    campaign_id: NotRequired[Id | None]


@with_config(_ALLOW)
class EmailClicked(TypedDict):
    message_id: Id
    campaign_id: NotRequired[Id | None]
    url: Url


@with_config(_ALLOW)
class EmailBounced(TypedDict):
    message_id: Id
    bounce_type: Literal["hard", "soft"]
    reason: NotRequired[Annotated[str, Field(max_length=1000)] | None]


@with_config(_ALLOW)
class ChatMessage(TypedDict):
    conversation_id: Id
    direction: Literal["inbound", "outbound"]
    text: Text
    agent_id: NotRequired[Id | None]


@with_config(_ALLOW)
class CallCompleted(TypedDict):
    call_id: Id
    direction: Literal["inbound", "outbound"]
    duration_seconds: Annotated[int, Field(ge=0, le=86_400)]
    outcome: Literal["answered", "voicemail", "missed", "busy", "failed"]
    notes: NotRequired[Text | None]


@with_config(_ALLOW)
class SocialMention(TypedDict):
    network: Literal["x", "facebook", "instagram", "linkedin", "tiktok", "reddit", "other"]
    url: NotRequired[Annotated[str, Field(max_length=2048)] | None]
    text: Text
    sentiment: NotRequired[Literal["positive", "neutral", "negative"] | None]


@with_config(_ALLOW)
class OrderPlaced(TypedDict):
    order_id: Id
    total: Money
    items: NotRequired[Annotated[int, Field(ge=1, le=10_000)] | None]


@with_config(_ALLOW)
class OrderRefunded(TypedDict):
    order_id: Id
    amount: Money
    reason: NotRequired[Text | None]


@with_config(_ALLOW)
class TicketOpened(TypedDict):
    ticket_id: Id
    subject: NotRequired[Text | None]
    priority: NotRequired[Literal["low", "normal", "high", "urgent"] | None]


@with_config(_ALLOW)
class TicketResolved(TypedDict):
    ticket_id: Id
    resolution: NotRequired[Literal["solved", "wont_fix", "duplicate", "no_response"] | None]
    satisfaction: NotRequired[Annotated[int, Field(ge=1, le=5)] | None]


@with_config(_ALLOW)
class ConsentChanged(TypedDict):
    purpose: Literal["email_marketing", "sms_marketing", "call_marketing", "tracking", "profiling"]
    status: Literal["granted", "withdrawn"]
    basis: NotRequired[Literal["consent", "contract", "legitimate_interest"] | None]


@with_config(_ALLOW)
class WebEvent(TypedDict):
    """A web/app action with no typed event of its own (Segment track/screen/group calls)."""

    action: Literal["track", "screen", "group"]
    name: Annotated[str, Field(min_length=1, max_length=500)]
    properties: NotRequired[
        Annotated[dict[str, Any], Field(description="As the site sent them.")] | None
    ]


@with_config(_ALLOW)
class EmailDelivered(TypedDict):
    message_id: Id
    campaign_id: NotRequired[Id | None]


@with_config(_ALLOW)
class IdentityLinked(TypedDict):
    """A channel said who someone is (Segment identify/alias); identifiers ride in the envelope."""

    via: Literal["identify", "alias"]
    traits: NotRequired[Annotated[dict[str, Any], Field(description="Profile traits sent.")] | None]


@with_config(_ALLOW)
class CustomersMerged(TypedDict):
    """Identity stitching found two customers to be one: ``merged_customer_id`` joins this one."""

    merged_customer_id: CustomerId
    identifier_type: Annotated[str, Field(max_length=50)]


@with_config(_ALLOW)
class IdentityLinkRefused(TypedDict):
    """A link that would pass the per-identifier-type limit was refused (no merge happened)."""

    identifier_type: Annotated[str, Field(max_length=50)]
    limit: Annotated[int, Field(ge=0)]
    other_customer_id: NotRequired[CustomerId | None]


@with_config(_ALLOW)
class CustomerForgotten(TypedDict):
    """Written by ``ledger forget``: the data key was destroyed (crypto-shredding)."""

    reason: NotRequired[Annotated[str, Field(max_length=500)] | None]


# --------------------------------------------------------------------------- event types

#: type -> (channel, payload). The one place that says which channel owns which type.
EVENT_TYPES: dict[str, tuple[str, type]] = {
    "page_viewed": ("web", PageViewed),
    "form_submitted": ("web", FormSubmitted),
    "email_sent": ("email", EmailSent),
    "email_opened": ("email", EmailOpened),
    "email_clicked": ("email", EmailClicked),
    "email_bounced": ("email", EmailBounced),
    "chat_message": ("chat", ChatMessage),
    "call_completed": ("call", CallCompleted),
    "social_mention": ("social", SocialMention),
    "order_placed": ("commerce", OrderPlaced),
    "order_refunded": ("commerce", OrderRefunded),
    "ticket_opened": ("support", TicketOpened),
    "ticket_resolved": ("support", TicketResolved),
    "consent_changed": ("system", ConsentChanged),
    "customer_forgotten": ("system", CustomerForgotten),
    "web_event": ("web", WebEvent),
    "email_delivered": ("email", EmailDelivered),
    "identity_linked": ("system", IdentityLinked),
    "customers_merged": ("system", CustomersMerged),
    "identity_link_refused": ("system", IdentityLinkRefused),
}
CHANNEL_OF: dict[str, str] = {t: c for t, (c, _) in EVENT_TYPES.items()}
#: Per type, the payload fields that are personal data (free text a person wrote or said).
PERSONAL_FIELDS: dict[str, frozenset[str]] = {t: frozenset() for t in EVENT_TYPES} | {
    "form_submitted": frozenset({"fields"}),
    "chat_message": frozenset({"text"}),
    "call_completed": frozenset({"notes"}),
    "social_mention": frozenset({"text"}),
    "order_refunded": frozenset({"reason"}),
    "ticket_opened": frozenset({"subject"}),
    "web_event": frozenset({"properties"}),
    "identity_linked": frozenset({"traits"}),
}
#: Envelope field names; anything else at the top level is an unknown field.
ENVELOPE_FIELDS = frozenset(
    {
        "event_id",
        "customer_id",
        "channel",
        "type",
        "occurred_at",
        "source",
        "identifiers",
        "payload",
        "schema_version",
    }
)
PAYLOAD_FIELDS: dict[str, frozenset[str]] = {
    t: frozenset(p.__annotations__) for t, (_, p) in EVENT_TYPES.items()
}

_ENVELOPE_DOCS = {
    "event_id": "Chosen by the producer; the idempotency key.",
    "occurred_at": "When it happened, ISO 8601 with a timezone; stored in UTC.",
    "source": "Which adapter produced the event, e.g. 'web-tracker'.",
}


def _event_schema(type_name: str, channel: str, payload: type) -> type:
    """The TypedDict of one event type: the envelope with its channel, type and payload."""
    fields: dict[str, Any] = {
        "event_id": Annotated[UUID, Field(description=_ENVELOPE_DOCS["event_id"])],
        "customer_id": CustomerId,
        # A one-value Literal: a mismatch is reported as "channel does not match type".
        "channel": Literal[channel],
        "type": Literal[type_name],
        "occurred_at": Annotated[AwareDatetime, Field(description=_ENVELOPE_DOCS["occurred_at"])],
        "source": Annotated[
            str, Field(min_length=1, max_length=200, description=_ENVELOPE_DOCS["source"])
        ],
        "identifiers": NotRequired[Identifiers | None],
        "payload": payload,
        "schema_version": NotRequired[Literal[1] | None],
    }
    name = "".join(part.capitalize() for part in type_name.split("_")) + "Event"
    schema = with_config(_ALLOW)(TypedDict(name, fields))  # type: ignore[operator]
    schema.__doc__ = f"A '{type_name}' event (channel '{channel}')."
    return schema


EVENT_SCHEMAS: dict[str, type] = {t: _event_schema(t, c, p) for t, (c, p) in EVENT_TYPES.items()}
AnyEvent = Annotated[Union[tuple(EVENT_SCHEMAS.values())], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
# Validating into plain dicts (not model instances) is 3x faster here and the result
# serialises with orjson directly: the ledger's hot path (see BENCHMARKS.md).
_ADAPTER: TypeAdapter[dict[str, Any]] = TypeAdapter(AnyEvent)  # type: ignore[arg-type]


class Event(dict[str, Any]):
    """A validated event: the JSON object, with typed values (UUID, datetime, Decimal).

    It is a dict so it serialises with orjson as is; the properties are conveniences.
    """

    @property
    def event_id(self) -> UUID:
        return self["event_id"]

    @property
    def customer_id(self) -> str:
        return self["customer_id"]

    @property
    def channel(self) -> str:
        return self["channel"]

    @property
    def type(self) -> str:
        return self["type"]

    @property
    def occurred_at(self) -> dt.datetime:
        return self["occurred_at"]

    @property
    def source(self) -> str:
        return self["source"]

    @property
    def payload(self) -> dict[str, Any]:
        return self["payload"]

    @property
    def identifiers(self) -> dict[str, Any] | None:
        return self.get("identifiers")

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, UTC times with Z, decimals as strings)."""
        return orjson.dumps(self, default=str, option=_JSON_OPTIONS)


_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z


# --------------------------------------------------------------------------- parsing


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems(error: ValidationError) -> list[str]:
    """Turn pydantic's errors into sentences naming the field, the input and the expectation."""
    out = []
    for err in error.errors(include_url=False):
        loc = list(err["loc"])
        tag = None
        # Discriminated unions put the type tag first: it is not a field.
        if loc and isinstance(loc[0], str) and loc[0] in EVENT_SCHEMAS:
            tag = loc.pop(0)
        field = ".".join(str(p) for p in loc) or "event"
        kind = err["type"]
        given = err.get("input")
        if kind == "union_tag_invalid":
            out.append(
                f"type: unknown event type {_describe(err['ctx']['tag'])}; expected one of "
                + ", ".join(sorted(EVENT_SCHEMAS))
            )
        elif kind == "union_tag_not_found":
            out.append("type: missing; every event needs a type such as 'page_viewed'")
        elif kind == "missing":
            out.append(f"{field}: missing, a required field")
        elif field == "channel" and kind == "literal_error" and tag:
            out.append(
                f"channel: {_describe(given)} does not match type {tag!r}: expected channel "
                f"{CHANNEL_OF[str(tag)]!r}"
            )
        elif kind == "timezone_aware":
            out.append(
                f"{field}: {_describe(given)} has no timezone; expected an ISO 8601 time with "
                "an offset, e.g. 2026-03-01T12:00:00Z"
            )
        elif kind == "extra_forbidden":
            out.append(f"{field}: unknown field (given {_describe(given)})")
        elif not loc and kind in ("dict_type", "model_type", "typed_dict_type"):
            out.append("event: expected a JSON object")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{field}: {msg} (given {_describe(given)})")
    return out


def extras_of(event: dict[str, Any]) -> dict[str, Any]:
    """Fields outside the contract, keyed by their dotted path."""
    # The common case (no unknown field) is one C-level subset test and builds nothing.
    if ENVELOPE_FIELDS.issuperset(event):
        extra: dict[str, Any] = {}
    else:
        extra = {k: v for k, v in event.items() if k not in ENVELOPE_FIELDS}
    payload = event["payload"]
    known = PAYLOAD_FIELDS[event["type"]]
    if len(payload) > len(known) or not payload.keys() <= known:
        extra.update({f"payload.{k}": v for k, v in payload.items() if k not in known})
    return extra


def _drop_nulls(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def _finish(event: dict[str, Any], strict: bool, now: dt.datetime | None) -> Event:
    """Checks pydantic cannot express cheaply: time range, strictness; UTC normalisation.

    An optional field sent as JSON null means "absent" (as most producers' libraries send
    it): nulls are dropped here so stored events and projections never see them.
    """
    if None in event.values():
        event = _drop_nulls(event)
    if None in event["payload"].values():
        event["payload"] = _drop_nulls(event["payload"])
    identifiers = event.get("identifiers")
    if identifiers is not None and None in identifiers.values():
        event["identifiers"] = _drop_nulls(identifiers) or None
        if event["identifiers"] is None:
            del event["identifiers"]
    try:
        occurred = event["occurred_at"].astimezone(dt.UTC)
    except OverflowError:
        # 9999-12-31T23:00-14:00 is a valid aware time that has no UTC equivalent.
        given = event["occurred_at"].isoformat()
        raise ContractError(
            [
                f"occurred_at: {given!r} has no UTC equivalent; expected a time between years "
                "1 and 9999 once converted to UTC"
            ]
        ) from None
    limit = (now or dt.datetime.now(dt.UTC)) + MAX_FUTURE_SKEW
    if occurred > limit:
        raise ContractError(
            [
                f"occurred_at: {occurred.isoformat()} is in the future; expected a "
                f"time before {limit.isoformat(timespec='seconds')}"
            ]
        )
    event["occurred_at"] = occurred
    extra = extras_of(event)
    if extra:
        if strict:
            raise ContractError(
                [
                    f"{name}: unknown field (given {_describe(value)}); strict mode accepts "
                    "only the contract's fields"
                    for name, value in extra.items()
                ]
            )
        _check_storable(extra)
    return Event(event)


def _check_storable(extra: dict[str, Any]) -> None:
    """Unknown fields are stored as JSON as given: each must survive canonical encoding."""
    for name, value in extra.items():
        try:
            orjson.dumps(value)
        except TypeError:
            raise ContractError(
                [
                    f"{name}: {_describe(value)} cannot be stored; expected JSON whose "
                    "integers fit in 64 bits"
                ]
            ) from None


def parse_line(raw: bytes | str, *, strict: bool = False, now: dt.datetime | None = None) -> Event:
    """Validate one JSON document. Raises :class:`ContractError` with every problem found."""
    try:
        data = raw.encode() if isinstance(raw, str) else raw
    except UnicodeEncodeError as exc:
        # A str holding a lone surrogate (e.g. from a lenient decoder) has no UTF-8 form.
        raise ContractError([f"event: not valid UTF-8 text ({exc.reason})"]) from None
    if len(data) > MAX_EVENT_BYTES:
        raise ContractError(
            [f"event: {len(data):,} bytes is over the limit of {MAX_EVENT_BYTES:,} bytes"]
        )
    if not data.strip():
        raise ContractError(["event: empty; expected a JSON object"])
    try:
        event = _ADAPTER.validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            try:
                orjson.loads(data)
            except orjson.JSONDecodeError as jexc:
                raise ContractError([f"event: not valid JSON ({jexc})"]) from None
        raise ContractError(_problems(exc)) from None
    return _finish(event, strict, now)


def parse_event(
    data: dict[str, Any], *, strict: bool = False, now: dt.datetime | None = None
) -> Event:
    """Validate one event given as a dict. Same rules and errors as :func:`parse_line`."""
    if not isinstance(data, dict):
        raise ContractError([f"event: expected a JSON object, got {type(data).__name__}"])
    try:
        raw = orjson.dumps(data, default=str)
    except TypeError:
        # orjson refuses integers beyond 64 bits; the standard library encodes them, so
        # validation can name the field that holds one.
        try:
            raw = json.dumps(data, default=str).encode()
        except (TypeError, ValueError) as exc:
            raise ContractError([f"event: cannot be encoded as JSON ({exc})"]) from None
    return parse_line(raw, strict=strict, now=now)


def event_json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per event type, plus ``envelope``: what ``schemas/`` holds."""
    schemas: dict[str, dict[str, Any]] = {}
    sample = TypeAdapter(EVENT_SCHEMAS["page_viewed"]).json_schema()
    envelope = {
        "title": "Envelope",
        "description": "Fields every event carries; `payload` is typed by `type` "
        "(see <type>.schema.json).",
        "type": "object",
        "properties": {
            **{k: v for k, v in sample["properties"].items() if k != "payload"},
            "channel": {"enum": list(CHANNELS), "type": "string"},
            "type": {"enum": sorted(EVENT_SCHEMAS), "type": "string"},
            "payload": {"type": "object"},
        },
        "required": sample["required"],
        "$defs": {k: v for k, v in sample.get("$defs", {}).items() if k == "Identifiers"},
    }
    schemas["envelope"] = envelope
    for name, td in EVENT_SCHEMAS.items():
        schema = TypeAdapter(td).json_schema()
        schema["$id"] = f"https://ledger.example/schemas/{name}.schema.json"
        schema["description"] = (
            f"A '{name}' event (channel '{CHANNEL_OF[name]}'). Personal payload fields, "
            f"encrypted at rest: {sorted(PERSONAL_FIELDS[name]) or 'none'}."
        )
        schemas[name] = schema
    for schema in schemas.values():
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schemas


def cloudevent_headers(event: Event) -> list[tuple[str, bytes]]:
    """CloudEvents 1.0 binary-mode Kafka headers for an event (the mapping in the docstring)."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", str(event.event_id).encode()),
        ("ce_source", event.source.encode()),
        ("ce_type", f"com.ledger.{event.type}".encode()),
        ("ce_subject", event.customer_id.encode()),
        ("ce_time", event.occurred_at.isoformat().encode()),
        ("content-type", b"application/json"),
    ]
