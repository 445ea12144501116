"""Provider webhooks mapped to contract events: SendGrid, Twilio, JSON for chat and social.

Each provider authenticates like the Segment routes: the write key as the
basic-auth user name, which both SendGrid and Twilio support by putting it in
the webhook URL (``https://KEY:@collector.example/webhooks/sendgrid``). A source
can also require the provider's own signature (SendGrid's Signed Event Webhook,
Twilio's ``X-Twilio-Signature``; see :mod:`ledger.collector.signing`), checked
on the body as received before it is parsed.

SendGrid event webhook (a JSON array of events; ``sg_event_id`` is the idempotency key;
``message_id`` is ``sg_message_id`` up to ``.filter``, the X-Message-Id of the send):

===================================  ===============================================
SendGrid ``event``                   ledger event
===================================  ===============================================
processed                            ``email_sent``
delivered                            ``email_delivered``
open                                 ``email_opened``
click                                ``email_clicked`` {url}
bounce                               ``email_bounced`` (``type`` "blocked" → soft, else hard)
deferred                             ``email_bounced`` soft, reason = SMTP response
dropped                              ``email_bounced`` hard, reason "dropped: <reason>"
spamreport, unsubscribe,             ``consent_changed`` {purpose email_marketing,
group_unsubscribe                    status withdrawn}
group_resubscribe                    ``consent_changed`` {…, status granted}
===================================  ===============================================

``campaign_id`` comes from ``marketing_campaign_id`` (or a ``campaign_id`` custom
argument). The customer is found by the (lower-cased) ``email``.

Twilio call status callback (form-encoded, one request per status change): the
final statuses become one ``call_completed`` per ``CallSid`` — completed →
answered (or voicemail when ``AnsweredBy`` says a machine answered), busy → busy,
no-answer and canceled → missed, failed → failed; ``duration_seconds`` is
``CallDuration``. Progress statuses (queued, initiated, ringing, in-progress) are
acknowledged and not stored: they are not touchpoints. The customer is ``From``
for inbound calls and ``To`` for outbound ones, as E.164.

JSON webhooks, for chat and social tools without a standard format, take one
object or an array of objects (``id`` is the idempotency key):

* ``POST /webhooks/chat``: ``{"id", "conversation_id", "direction": "inbound"|"outbound",
  "text", "agent_id"?, "occurred_at", "contact": {"email"?, "phone"?, "user_id"?,
  "anonymous_id"?, "name"?}}`` → ``chat_message``;
* ``POST /webhooks/social``: ``{"id", "network", "url"?, "text", "sentiment"?,
  "occurred_at", "author": {"handle", "name"?, "email"?}}`` → ``social_mention``
  (the handle is stitched as ``network:handle``).
"""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ledger.collector.intake import Problem
from ledger.collector.touch import (
    MappingError,
    Touch,
    event_id,
    identifiers_of,
    normalise_email,
    normalise_handle,
    normalise_phone,
    parse_time,
    plain_id,
)
from ledger.collector.wire import MAX_BATCH_BYTES, Refusal, collector_of, guarded
from ledger.contract import CHANNEL_OF, MAX_EVENT_BYTES

_SENDGRID_CONSENT = {
    "spamreport": "withdrawn",
    "unsubscribe": "withdrawn",
    "group_unsubscribe": "withdrawn",
    "group_resubscribe": "granted",
}
_TWILIO_FINAL = {
    "completed": "answered",
    "busy": "busy",
    "no-answer": "missed",
    "canceled": "missed",
    "failed": "failed",
}


def _touch(
    source: str,
    key: str,
    type_: str,
    payload: dict[str, Any],
    occurred_at: dt.datetime,
    ids: tuple[dict[str, str], list[tuple[str, str]]],
    raw: bytes,
) -> Touch:
    envelope, pairs = ids
    if not pairs:
        raise MappingError(["no identifier: expected an email, phone, user id or handle"])
    event: dict[str, Any] = {
        "event_id": event_id(source, key),
        "channel": CHANNEL_OF[type_],
        "type": type_,
        "occurred_at": occurred_at,
        "source": source,
        "payload": payload,
        "schema_version": 1,
        "identifiers": envelope,
    }
    return Touch(event=event, ids=pairs, raw=raw)


# --------------------------------------------------------------------------- SendGrid


def map_sendgrid(item: Any, *, source: str, received_at: dt.datetime) -> Touch:
    if not isinstance(item, dict):
        raise MappingError([f"event: expected a JSON object, got {type(item).__name__}"])
    kind = item.get("event") if isinstance(item.get("event"), str) else repr(item.get("event"))
    sg_event_id = plain_id(item.get("sg_event_id"))
    if not sg_event_id:
        raise MappingError(["sg_event_id: missing; SendGrid sends one with every event"])
    address = normalise_email(item.get("email"))
    if not address:
        raise MappingError([f"email: {str(item.get('email'))[:60]!r} is not an email address"])
    stamp = item.get("timestamp")
    occurred = received_at
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        try:
            occurred = dt.datetime.fromtimestamp(stamp, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise MappingError([f"timestamp: {stamp!r} is not a Unix time in seconds"]) from None
    message = plain_id(item.get("sg_message_id")) or plain_id(item.get("smtp-id"))
    if message and ".filter" in message:
        message = message.split(".filter", 1)[0]
    payload: dict[str, Any] = {"message_id": message} if message else {}
    campaign = plain_id(item.get("marketing_campaign_id")) or plain_id(item.get("campaign_id"))
    if campaign:
        payload["campaign_id"] = campaign
    if kind in _SENDGRID_CONSENT:
        type_ = "consent_changed"
        payload = {"purpose": "email_marketing", "status": _SENDGRID_CONSENT[kind]}
    elif kind == "processed":
        type_ = "email_sent"
    elif kind == "delivered":
        type_ = "email_delivered"
    elif kind == "open":
        type_ = "email_opened"
    elif kind == "click":
        type_ = "email_clicked"
        if isinstance(item.get("url"), str):
            payload["url"] = item["url"]
    elif kind in ("bounce", "deferred", "dropped"):
        type_ = "email_bounced"
        reason = item.get("reason") or item.get("response")
        if kind == "bounce":
            payload["bounce_type"] = "soft" if item.get("type") == "blocked" else "hard"
        else:
            payload["bounce_type"] = "soft" if kind == "deferred" else "hard"
            reason = f"{kind}: {reason}" if reason else kind
        if isinstance(reason, str) and reason:
            payload["reason"] = reason[:1000]
    else:
        raise MappingError(
            [
                f"event: {str(kind)[:40]!r} is not a SendGrid event this collector maps; "
                "expected processed, delivered, open, click, bounce, deferred, dropped, "
                "spamreport, unsubscribe, group_unsubscribe or group_resubscribe"
            ]
        )
    ids = identifiers_of(email=address)
    return _touch(
        source, f"sendgrid:{sg_event_id}", type_, payload, occurred, ids, orjson.dumps(item)
    )


# --------------------------------------------------------------------------- Twilio


def map_twilio_call(form: dict[str, str], *, source: str, received_at: dt.datetime) -> Touch | None:
    """A ``call_completed`` for a final status; None for a progress status."""
    status = form.get("CallStatus", "")
    call_sid = plain_id(form.get("CallSid"))
    if not call_sid:
        raise MappingError(["CallSid: missing; Twilio sends it with every status callback"])
    if status not in _TWILIO_FINAL:
        if status in ("queued", "initiated", "ringing", "in-progress"):
            return None
        raise MappingError([f"CallStatus: {status[:40]!r} is not a Twilio call status"])
    direction = "inbound" if form.get("Direction", "inbound") == "inbound" else "outbound"
    party = form.get("From") if direction == "inbound" else form.get("To")
    phone = normalise_phone(party)
    if not phone:
        raise MappingError(
            [f"{'From' if direction == 'inbound' else 'To'}: not an E.164 phone number"]
        )
    outcome = _TWILIO_FINAL[status]
    if outcome == "answered" and form.get("AnsweredBy", "").startswith("machine"):
        outcome = "voicemail"
    duration = form.get("CallDuration", "0")
    if not (duration.isascii() and duration.isdigit()):  # "²".isdigit() is true
        raise MappingError([f"CallDuration: {duration[:20]!r} is not a number of seconds"])
    occurred = received_at
    if form.get("Timestamp"):
        try:
            occurred = email.utils.parsedate_to_datetime(form["Timestamp"])
        except (TypeError, ValueError):
            raise MappingError(
                [f"Timestamp: {form['Timestamp'][:60]!r} is not an RFC 2822 time"]
            ) from None
    payload = {
        "call_id": call_sid,
        "direction": direction,
        "duration_seconds": int(duration),
        "outcome": outcome,
    }
    raw = orjson.dumps(form)
    return _touch(
        source,
        f"twilio:{call_sid}",
        "call_completed",
        payload,
        occurred,
        identifiers_of(phone=phone),
        raw,
    )


# --------------------------------------------------------------------------- JSON (chat, social)


def _contact_ids(
    contact: Any, handle_network: str | None = None
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    contact = contact if isinstance(contact, dict) else {}
    return identifiers_of(
        user_id=plain_id(contact.get("user_id")),
        anonymous_id=plain_id(contact.get("anonymous_id")),
        email=normalise_email(contact.get("email")),
        phone=normalise_phone(contact.get("phone")),
        social_handle=normalise_handle(contact.get("handle"), handle_network),
        name=contact.get("name"),
    )


def map_chat(item: Any, *, source: str, received_at: dt.datetime) -> Touch:
    if not isinstance(item, dict):
        raise MappingError([f"message: expected a JSON object, got {type(item).__name__}"])
    key = plain_id(item.get("id"))
    if not key:
        raise MappingError(["id: missing; each chat message needs its id (the idempotency key)"])
    payload = {
        k: item[k] for k in ("conversation_id", "direction", "text", "agent_id") if k in item
    }
    occurred = parse_time(item.get("occurred_at"), "occurred_at") or received_at
    ids = _contact_ids(item.get("contact"))
    return _touch(source, f"chat:{key}", "chat_message", payload, occurred, ids, orjson.dumps(item))


def map_social(item: Any, *, source: str, received_at: dt.datetime) -> Touch:
    if not isinstance(item, dict):
        raise MappingError([f"mention: expected a JSON object, got {type(item).__name__}"])
    key = plain_id(item.get("id"))
    if not key:
        raise MappingError(["id: missing; each mention needs its id (the idempotency key)"])
    payload = {k: item[k] for k in ("network", "url", "text", "sentiment") if k in item}
    network = item.get("network") if isinstance(item.get("network"), str) else None
    occurred = parse_time(item.get("occurred_at"), "occurred_at") or received_at
    ids = _contact_ids(item.get("author"), network)
    return _touch(
        source, f"social:{key}", "social_mention", payload, occurred, ids, orjson.dumps(item)
    )


# --------------------------------------------------------------------------- routes


def _items(body: Any) -> list[Any]:
    return body if isinstance(body, list) else [body]


def _json_route(mapper: Any, path: str, provider: str | None = None) -> Route:
    async def endpoint(request: Request) -> Response:
        collector = collector_of(request)
        received = dt.datetime.now(dt.UTC)
        source = collector.body_source(collector.header_source(request), None)
        data = await collector.body(request, MAX_BATCH_BYTES)
        if provider:
            collector.check_signature(provider, source, request, data)
        body = collector.parse(data)
        if not isinstance(body, list | dict):
            raise Refusal(400, "invalid_body", "request body: expected a JSON object or array")
        touches: list[tuple[int, Touch]] = []
        problems: list[Problem] = []
        for index, item in enumerate(_items(body)):
            raw = orjson.dumps(item)
            if len(raw) > MAX_EVENT_BYTES:
                raise Refusal(
                    400,
                    "too_large",
                    f"event {index}: {len(raw):,} bytes is over the limit of "
                    f"{MAX_EVENT_BYTES // 1024} KB per event",
                )
            try:
                touches.append((index, mapper(item, source=source.name, received_at=received)))
            except MappingError as exc:
                problems.append(Problem(index, exc.problems, None, raw))
        return await collector.store(source, touches, problems)

    endpoint.__name__ = path.rsplit("/", 1)[-1]
    return Route(path, guarded(endpoint), methods=["POST"])


def _twilio_route() -> Route:
    async def twilio_call_status(request: Request) -> Response:
        collector = collector_of(request)
        received = dt.datetime.now(dt.UTC)
        source = collector.body_source(collector.header_source(request), None)
        data = await collector.body(request, MAX_EVENT_BYTES)
        try:
            parsed = parse_qs(data.decode(), keep_blank_values=True, strict_parsing=bool(data))
        except (UnicodeDecodeError, ValueError):
            raise Refusal(
                400, "invalid_form", "request body: not application/x-www-form-urlencoded"
            ) from None
        collector.check_signature("twilio", source, request, data, parsed)
        form = {k: v[0] for k, v in parsed.items()}
        try:
            touch = map_twilio_call(form, source=source.name, received_at=received)
        except MappingError as exc:
            problem = Problem(0, exc.problems, None, orjson.dumps(form))
            return await collector.store(source, [], [problem])
        if touch is None:
            return JSONResponse(
                {
                    "success": True,
                    "stored": 0,
                    "rejected": [],
                    "note": "progress status, not stored",
                }
            )
        return await collector.store(source, [(0, touch)], [])

    return Route("/webhooks/twilio/call-status", guarded(twilio_call_status), methods=["POST"])


def routes() -> list[Route]:
    return [
        _json_route(map_sendgrid, "/webhooks/sendgrid", "sendgrid"),
        _twilio_route(),
        _json_route(map_chat, "/webhooks/chat"),
        _json_route(map_social, "/webhooks/social"),
    ]
