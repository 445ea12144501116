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
* Unknown fields: in strict mode they are rejected, naming each one; otherwise
  they are kept, encrypted, in the stored event's ``extra`` bag so nothing a
  producer sent is silently lost.
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
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Union
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

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


def _max_four_places(value: Decimal) -> Decimal:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -4:
        raise ValueError("expected a finite amount with at most 4 decimal places")
    return value


def _iso_currency(value: str) -> str:
    if value not in ISO_4217:
        raise ValueError(f"expected an ISO 4217 currency code such as EUR or USD, got {value!r}")
    return value


def _utc(value: dt.datetime) -> dt.datetime:
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        # 9999-12-31T23:00-14:00 is a valid aware time that has no UTC equivalent.
        raise ValueError("expected a time between years 1 and 9999 once converted to UTC") from None


Amount = Annotated[
    Decimal, BeforeValidator(_no_float), Field(ge=0), AfterValidator(_max_four_places)
]
Currency = Annotated[str, AfterValidator(_iso_currency)]
Timestamp = Annotated[AwareDatetime, AfterValidator(_utc)]
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


class Money(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    amount: Amount = Field(description='Decimal string such as "19.99"; never a float.')
    currency: Currency = Field(description="ISO 4217 code, e.g. EUR.")


class Identifiers(BaseModel):
    """Ways the channel knows the person. All of it is personal data (encrypted at rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    email: Annotated[str, Field(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = (
        None
    )
    phone: Annotated[str, Field(pattern=r"^\+[1-9][0-9]{6,14}$")] | None = Field(
        default=None, description="E.164, e.g. +4915112345678."
    )
    anonymous_id: Annotated[str, Field(max_length=200)] | None = None
    user_id: Annotated[str, Field(max_length=200)] | None = None
    social_handle: Annotated[str, Field(max_length=200)] | None = None
    name: Name | None = None


# --------------------------------------------------------------------------- payloads


class Payload(BaseModel):
    """Base of every payload. Unknown fields are allowed here and judged by the strictness."""

    model_config = ConfigDict(extra="allow", frozen=True)
    #: Fields holding personal data; encrypted with the customer's key.
    personal: ClassVar[frozenset[str]] = frozenset()


class PageViewed(Payload):
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    title: Annotated[str, Field(max_length=500)] | None = None
    referrer: Annotated[str, Field(max_length=2048)] | None = None
    duration_ms: Annotated[int, Field(ge=0)] | None = None


class FormSubmitted(Payload):
    personal: ClassVar[frozenset[str]] = frozenset({"fields"})
    form_id: Annotated[str, Field(min_length=1, max_length=200)]
    url: Annotated[str, Field(max_length=2048)] | None = None
    fields: dict[str, Text] = Field(default_factory=dict, description="What the person typed.")


class EmailSent(Payload):
    message_id: Annotated[str, Field(min_length=1, max_length=200)]
    campaign_id: Annotated[str, Field(max_length=200)] | None = None
    subject: Annotated[str, Field(max_length=500)] | None = None


class EmailOpened(Payload):
    message_id: Annotated[str, Field(min_length=1, max_length=200)]
    campaign_id: Annotated[str, Field(max_length=200)] | None = None


class EmailClicked(Payload):
    message_id: Annotated[str, Field(min_length=1, max_length=200)]
    campaign_id: Annotated[str, Field(max_length=200)] | None = None
    url: Annotated[str, Field(min_length=1, max_length=2048)]


class EmailBounced(Payload):
    message_id: Annotated[str, Field(min_length=1, max_length=200)]
    bounce_type: Literal["hard", "soft"]
    reason: Annotated[str, Field(max_length=1000)] | None = None


class ChatMessage(Payload):
    personal: ClassVar[frozenset[str]] = frozenset({"text"})
    conversation_id: Annotated[str, Field(min_length=1, max_length=200)]
    direction: Literal["inbound", "outbound"]
    text: Text
    agent_id: Annotated[str, Field(max_length=200)] | None = None


class CallCompleted(Payload):
    personal: ClassVar[frozenset[str]] = frozenset({"notes"})
    call_id: Annotated[str, Field(min_length=1, max_length=200)]
    direction: Literal["inbound", "outbound"]
    duration_seconds: Annotated[int, Field(ge=0, le=86_400)]
    outcome: Literal["answered", "voicemail", "missed", "busy", "failed"]
    notes: Text | None = None


class SocialMention(Payload):
    personal: ClassVar[frozenset[str]] = frozenset({"text"})
    network: Literal["x", "facebook", "instagram", "linkedin", "tiktok", "reddit", "other"]
    url: Annotated[str, Field(max_length=2048)] | None = None
    text: Text
    sentiment: Literal["positive", "neutral", "negative"] | None = None


class OrderPlaced(Payload):
    order_id: Annotated[str, Field(min_length=1, max_length=200)]
    total: Money
    items: Annotated[int, Field(ge=1, le=10_000)] = 1


class OrderRefunded(Payload):
    personal: ClassVar[frozenset[str]] = frozenset({"reason"})
    order_id: Annotated[str, Field(min_length=1, max_length=200)]
    amount: Money
    reason: Text | None = None


class TicketOpened(Payload):
    personal: ClassVar[frozenset[str]] = frozenset({"subject"})
    ticket_id: Annotated[str, Field(min_length=1, max_length=200)]
    subject: Text | None = None
    priority: Literal["low", "normal", "high", "urgent"] = "normal"


class TicketResolved(Payload):
    ticket_id: Annotated[str, Field(min_length=1, max_length=200)]
    resolution: Literal["solved", "wont_fix", "duplicate", "no_response"] = "solved"
    satisfaction: Annotated[int, Field(ge=1, le=5)] | None = None


class ConsentChanged(Payload):
    purpose: Literal["email_marketing", "sms_marketing", "call_marketing", "tracking", "profiling"]
    status: Literal["granted", "withdrawn"]
    basis: Literal["consent", "contract", "legitimate_interest"] = "consent"


class CustomerForgotten(Payload):
    """Written by ``ledger forget``: the data key was destroyed (crypto-shredding)."""

    reason: Annotated[str, Field(max_length=500)] | None = None


# --------------------------------------------------------------------------- event types

#: type -> (channel, payload model). The one place that says which channel owns which type.
EVENT_TYPES: dict[str, tuple[str, type[Payload]]] = {
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
}
CHANNEL_OF: dict[str, str] = {t: c for t, (c, _) in EVENT_TYPES.items()}
#: Per type, the payload fields that are personal data.
PERSONAL_FIELDS: dict[str, frozenset[str]] = {t: p.personal for t, (_, p) in EVENT_TYPES.items()}


class Envelope(BaseModel):
    """Fields every event carries, whatever its type."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event_id: UUID = Field(description="Chosen by the producer; the idempotency key.")
    customer_id: CustomerId
    channel: Channel
    occurred_at: Timestamp = Field(description="When it happened, with a timezone.")
    source: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="Which adapter produced the event, e.g. 'web-tracker'."
    )
    identifiers: Identifiers | None = None
    schema_version: Literal[1] = 1

    expected_channel: ClassVar[str] = ""

    @field_validator("channel")
    @classmethod
    def _channel_matches_type(cls, channel: str) -> str:
        if cls.expected_channel and channel != cls.expected_channel:
            type_name = cls.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
            raise ValueError(
                f"does not match type {type_name!r}: expected channel {cls.expected_channel!r}"
            )
        return channel


def _event_model(type_name: str, channel: str, payload: type[Payload]) -> type[Envelope]:
    class_name = "".join(part.capitalize() for part in type_name.split("_")) + "Event"
    model: type[Envelope] = type(
        class_name,
        (Envelope,),
        {
            "__annotations__": {"type": Literal[type_name], "payload": payload},
            "__module__": __name__,
            "__doc__": f"A ``{type_name}`` event on channel ``{channel}``.",
            "expected_channel": channel,
        },
    )
    return model


EVENT_MODELS: dict[str, type[Envelope]] = {
    t: _event_model(t, c, p) for t, (c, p) in EVENT_TYPES.items()
}
AnyEvent = Annotated[Union[tuple(EVENT_MODELS.values())], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
_ADAPTER: TypeAdapter[Envelope] = TypeAdapter(AnyEvent)  # type: ignore[arg-type]

# --------------------------------------------------------------------------- parsing


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems(error: ValidationError) -> list[str]:
    """Turn pydantic's errors into sentences naming the field, the input and the expectation."""
    out = []
    for err in error.errors(include_url=False):
        loc = list(err["loc"])
        # Discriminated unions put the type tag first: it is not a field.
        if loc and isinstance(loc[0], str) and loc[0] in EVENT_MODELS:
            loc = loc[1:]
        field = ".".join(str(p) for p in loc) or "event"
        kind = err["type"]
        given = err.get("input")
        if kind == "union_tag_invalid":
            out.append(
                f"type: unknown event type {_describe(err['ctx']['tag'])}; expected one of "
                + ", ".join(sorted(EVENT_MODELS))
            )
        elif kind == "union_tag_not_found":
            out.append("type: missing; every event needs a type such as 'page_viewed'")
        elif kind == "missing":
            out.append(f"{field}: missing, a required field")
        elif kind == "timezone_aware":
            out.append(
                f"{field}: {_describe(given)} has no timezone; expected an ISO 8601 time with "
                "an offset, e.g. 2026-03-01T12:00:00Z"
            )
        elif kind == "extra_forbidden":
            out.append(f"{field}: unknown field (given {_describe(given)})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{field}: {msg} (given {_describe(given)})")
    return out


def _check_time(event: Envelope, now: dt.datetime | None) -> None:
    limit = (now or dt.datetime.now(dt.UTC)) + MAX_FUTURE_SKEW
    if event.occurred_at > limit:
        raise ContractError(
            [
                f"occurred_at: {event.occurred_at.isoformat()} is in the future; expected a "
                f"time before {limit.isoformat(timespec='seconds')}"
            ]
        )


def extras_of(event: Envelope) -> dict[str, Any]:
    """Fields outside the contract, keyed by their dotted path."""
    extra: dict[str, Any] = {}
    if event.model_extra:
        extra.update(event.model_extra)
    payload: Payload = event.payload  # type: ignore[attr-defined]
    if payload.model_extra:
        extra.update({f"payload.{k}": v for k, v in payload.model_extra.items()})
    return extra


def _check_strict(event: Envelope) -> None:
    extra = extras_of(event)
    if extra:
        raise ContractError(
            [
                f"{name}: unknown field (given {_describe(value)}); strict mode accepts only "
                "the contract's fields"
                for name, value in extra.items()
            ]
        )


def parse_line(
    raw: bytes | str, *, strict: bool = False, now: dt.datetime | None = None
) -> Envelope:
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
        if exc.errors()[0]["type"] == "json_invalid":
            try:
                orjson.loads(data)
            except orjson.JSONDecodeError as jexc:
                raise ContractError([f"event: not valid JSON ({jexc})"]) from None
        first = exc.errors()[0]
        if not first["loc"] and not first["type"].startswith("union_tag"):
            raise ContractError(["event: expected a JSON object"]) from None
        raise ContractError(_problems(exc)) from None
    _check_time(event, now)
    if strict:
        _check_strict(event)
    return event


def parse_event(
    data: dict[str, Any] | Envelope, *, strict: bool = False, now: dt.datetime | None = None
) -> Envelope:
    """Validate one event given as a dict (or re-check a model). Same rules as parse_line."""
    if isinstance(data, Envelope):
        _check_time(data, now)
        if strict:
            _check_strict(data)
        return data
    if not isinstance(data, dict):
        raise ContractError([f"event: expected a JSON object, got {type(data).__name__}"])
    try:
        raw = orjson.dumps(data, default=str)
    except TypeError as exc:
        raise ContractError([f"event: cannot be encoded as JSON ({exc})"]) from None
    return parse_line(raw, strict=strict, now=now)


def event_json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per event type, plus ``envelope``: what ``schemas/`` holds."""
    schemas: dict[str, dict[str, Any]] = {}
    envelope = Envelope.model_json_schema()
    envelope["title"] = "Envelope"
    envelope["properties"]["type"] = {"enum": sorted(EVENT_MODELS), "type": "string"}
    envelope["properties"]["payload"] = {"type": "object"}
    envelope["required"] = [*envelope.get("required", []), "type", "payload"]
    schemas["envelope"] = envelope
    for name, model in EVENT_MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://ledger.example/schemas/{name}.schema.json"
        schema["description"] = (
            f"A '{name}' event (channel '{CHANNEL_OF[name]}'). Personal payload fields, "
            f"encrypted at rest: {sorted(PERSONAL_FIELDS[name]) or 'none'}."
        )
        schemas[name] = schema
    for schema in schemas.values():
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schemas


def cloudevent_headers(event: Envelope) -> list[tuple[str, bytes]]:
    """CloudEvents 1.0 binary-mode Kafka headers for an event (the mapping in the docstring)."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", str(event.event_id).encode()),
        ("ce_source", event.source.encode()),
        ("ce_type", f"com.ledger.{event.type}".encode()),  # type: ignore[attr-defined]
        ("ce_subject", event.customer_id.encode()),
        ("ce_time", event.occurred_at.isoformat().encode()),
        ("content-type", b"application/json"),
    ]
