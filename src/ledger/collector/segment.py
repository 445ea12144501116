"""Segment's HTTP tracking API, mapped to contract events.

The mapping (also in README "HTTP collector"):

=========================  ===============================================================
Segment call               ledger event
=========================  ===============================================================
``page``                   ``page_viewed`` {url, title, referrer} from ``properties`` (or
                           ``context.page``); ``title`` falls back to the page ``name``
``track`` "Order           ``order_placed`` {order_id, total {amount, currency}, items}
Completed"                 (``total`` or ``revenue``; currency defaults to USD as Segment's)
``track`` "Order Refunded" ``order_refunded`` {order_id, amount {total, currency}}
``track`` "Form Submitted" ``form_submitted`` {form_id, url, fields}
``track`` named like a     that type, ``properties`` as its payload (e.g. ``chat_message``)
contract type
other ``track``            ``web_event`` {action "track", name, properties}
``screen``                 ``web_event`` {action "screen", name, properties}
``group``                  ``web_event`` {action "group", name = groupId, properties = traits}
``identify`` / ``alias``   ``identity_linked`` {via, traits}; the identity graph links the ids
=========================  ===============================================================

Identifiers: ``userId`` → user_id, ``anonymousId`` → anonymous_id, ``traits.email`` (or
``context.traits``) → email (lower-cased), ``traits.phone`` → phone if it is E.164,
``traits.name`` → name. ``alias`` links ``previousId`` to ``userId``, taking
``previousId`` as an anonymous id (re-keying one user id to another is not supported:
user ids are one per customer).

Event time follows Segment's clock-skew correction: with the client's
``timestamp`` (or ``originalTimestamp``) and ``sentAt`` both known, the event
happened at ``receivedAt - (sentAt - timestamp)``: the device clock may be
wrong, but the interval between the call and its sending is right. Without
``sentAt`` the timestamp is taken as given; without any, ``receivedAt``.

``messageId`` is the idempotency key: the event id is uuid5(source, messageId),
so a retried message is stored once. A message without one gets an id derived
from its content, which still makes exact retries idempotent.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from ledger.collector.touch import (
    MappingError,
    Touch,
    event_id,
    identifiers_of,
    normalise_email,
    normalise_phone,
    parse_time,
    plain_id,
)
from ledger.contract import EVENT_TYPES

CALLS = ("track", "identify", "page", "screen", "group", "alias")
#: Types a Segment ``track`` may name directly; the system's own types are not for sites.
_DIRECT_TYPES = frozenset(t for t, (c, _) in EVENT_TYPES.items() if c != "system")


@functools.lru_cache(maxsize=4096)
def _snake(name: str) -> str:
    # Cached: a site sends the same few event names over and over.
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def _object(value: Any, field_name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MappingError([f"{field_name}: expected a JSON object, got {type(value).__name__}"])
    return value


def _decimal_text(value: Any, field_name: str) -> str:
    """Segment sends money as JSON numbers; the contract wants a decimal string, exactly."""
    if isinstance(value, bool) or value is None:
        raise MappingError([f"{field_name}: missing; expected the order's amount"])
    try:
        # str() of a float is its shortest round-trip text: 19.99 stays "19.99".
        amount = Decimal(str(value)) if isinstance(value, int | float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise MappingError([f"{field_name}: {value!r} is not an amount"]) from None
    return str(amount)


def _quantity(product: Any) -> int:
    """A product line's quantity (Segment's ecommerce spec); 1 when not given."""
    if not isinstance(product, dict) or product.get("quantity") is None:
        return 1
    quantity = product["quantity"]
    if isinstance(quantity, bool) or not isinstance(quantity, int | float | str):
        raise MappingError([f"products[].quantity: {quantity!r} is not a whole number"])
    try:
        return int(quantity)
    except (ValueError, OverflowError):
        raise MappingError([f"products[].quantity: {quantity!r} is not a whole number"]) from None


def _occurred_at(msg: dict[str, Any], received_at: dt.datetime, batch_sent_at: Any) -> dt.datetime:
    stamp = parse_time(msg.get("timestamp"), "timestamp") or parse_time(
        msg.get("originalTimestamp"), "originalTimestamp"
    )
    sent = parse_time(msg.get("sentAt"), "sentAt") or parse_time(batch_sent_at, "sentAt")
    if stamp is None:
        return received_at
    if sent is None:
        return stamp
    try:
        return received_at - (sent - stamp)
    except OverflowError:
        raise MappingError(
            [
                "timestamp: the clock-skew correction (receivedAt - (sentAt - timestamp)) is out "
                "of range; expected sentAt and timestamp from the same clock"
            ]
        ) from None


def _message_id(msg: dict[str, Any]) -> str:
    given = plain_id(msg.get("messageId"))
    if given:
        return given
    return "content:" + hashlib.sha256(orjson.dumps(msg, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _track(name: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    snake = _snake(name)
    if snake == "order_completed":
        total = props.get("total", props.get("revenue"))
        products = props.get("products")
        payload: dict[str, Any] = {
            "order_id": plain_id(props.get("order_id") or props.get("checkout_id")),
            "total": {
                "amount": _decimal_text(total, "properties.total"),
                "currency": str(props.get("currency") or "USD").upper(),
            },
        }
        if isinstance(products, list) and products:
            payload["items"] = sum(_quantity(p) for p in products)
        return "order_placed", payload
    if snake == "order_refunded":
        return "order_refunded", {
            "order_id": plain_id(props.get("order_id")),
            "amount": {
                "amount": _decimal_text(props.get("total"), "properties.total"),
                "currency": str(props.get("currency") or "USD").upper(),
            },
        }
    if snake == "form_submitted":
        payload = {"form_id": plain_id(props.get("form_id"))}
        if isinstance(props.get("url"), str):
            payload["url"] = props["url"]
        if isinstance(props.get("fields"), dict):
            payload["fields"] = {k: str(v) for k, v in props["fields"].items()}
        return "form_submitted", payload
    if snake in _DIRECT_TYPES:
        return snake, dict(props)
    return "web_event", {"action": "track", "name": name, "properties": props}


def map_message(
    msg: Any,
    *,
    source: str,
    received_at: dt.datetime,
    call: str | None = None,
    batch_sent_at: Any = None,
    raw: bytes | None = None,
) -> Touch:
    """One Segment message (``call`` from the URL, or ``msg["type"]`` inside a batch).

    ``raw`` is the message's JSON when the caller already has it (kept for dead letters).
    """
    if not isinstance(msg, dict):
        raise MappingError([f"message: expected a JSON object, got {type(msg).__name__}"])
    kind = call or msg.get("type")
    if kind not in CALLS:
        raise MappingError(
            [f"type: {kind!r} is not a Segment call; expected one of {', '.join(CALLS)}"]
        )
    user_id = plain_id(msg.get("userId"))
    anonymous_id = plain_id(msg.get("anonymousId"))
    previous_id = plain_id(msg.get("previousId")) if kind == "alias" else None
    if kind == "alias" and not (previous_id and user_id):
        raise MappingError(["alias: needs both previousId and userId"])
    if not (user_id or anonymous_id):
        raise MappingError(["userId/anonymousId: missing; every call needs one of them"])
    context = _object(msg.get("context"), "context")
    traits = _object(msg.get("traits"), "traits")
    context_traits = _object(context.get("traits"), "context.traits")
    props = _object(msg.get("properties"), "properties")
    if traits or context_traits:
        known = {**context_traits, **traits}
        envelope_ids, ids = identifiers_of(
            user_id=user_id,
            anonymous_id=anonymous_id or previous_id,
            email=normalise_email(known.get("email")),
            phone=normalise_phone(known.get("phone")),
            name=known.get("name"),
        )
    else:  # most calls (page, track): ids only, the same result without the general path
        envelope_ids = {}
        ids = []
        if user_id:
            envelope_ids["user_id"] = user_id
            ids.append(("user_id", user_id))
        anonymous = anonymous_id or previous_id
        if anonymous:
            envelope_ids["anonymous_id"] = anonymous
            ids.append(("anonymous_id", anonymous))

    if kind == "page":
        page = _object(context.get("page"), "context.page")
        payload: dict[str, Any] = {}
        for key in ("url", "title", "referrer"):
            value = props.get(key) or page.get(key)
            if isinstance(value, str) and value:
                payload[key] = value
        if "title" not in payload and isinstance(msg.get("name"), str) and msg["name"]:
            payload["title"] = msg["name"][:500]
        type_, channel_payload = "page_viewed", payload
    elif kind == "track":
        name = msg.get("event")
        if not isinstance(name, str) or not name.strip():
            raise MappingError(["event: missing; a track call needs the event's name"])
        type_, channel_payload = _track(name, props)
    elif kind == "screen":
        name = msg.get("name") or props.get("name") or "screen"
        type_, channel_payload = (
            "web_event",
            {"action": "screen", "name": str(name), "properties": props},
        )
    elif kind == "group":
        group = plain_id(msg.get("groupId"))
        if not group:
            raise MappingError(["groupId: missing; a group call needs the group's id"])
        type_, channel_payload = (
            "web_event",
            {"action": "group", "name": group, "properties": traits},
        )
    else:  # identify, alias
        channel_payload = {"via": kind}
        if traits:
            channel_payload["traits"] = traits
        type_ = "identity_linked"

    message_id = _message_id(msg)
    event: dict[str, Any] = {
        "event_id": event_id(source, message_id),
        "channel": EVENT_TYPES[type_][0],
        "type": type_,
        "occurred_at": _occurred_at(msg, received_at, batch_sent_at),
        "source": source,
        "payload": channel_payload,
        "schema_version": 1,
    }
    if envelope_ids:
        event["identifiers"] = envelope_ids
    return Touch(event=event, ids=ids, raw=raw if raw is not None else orjson.dumps(msg))
