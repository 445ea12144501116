"""Lifecycle stages: the rules, in one place, and the fold that applies them.

Stages, in order (HubSpot style)::

    subscriber < lead < marketing_qualified < sales_qualified < opportunity < customer < advocate

plus ``churned``. A customer with no matching event has no stage (NULL).

Which event moves a customer to which stage (:data:`RULES`):

====================  ==============================================  ======================
event type            condition                                       target stage
====================  ==============================================  ======================
form_submitted        form_id = newsletter_signup                     subscriber
form_submitted        form_id = contact or download                   lead
chat_message          direction = inbound                             lead
call_completed        direction = inbound and outcome = answered      lead
email_clicked         (any)                                           marketing_qualified
form_submitted        form_id = demo_request                          sales_qualified
form_submitted        form_id = quote_request                         opportunity
order_placed          (any)                                           customer
social_mention        sentiment = positive, while customer            advocate
ticket_resolved       satisfaction = 5, while customer                advocate
====================  ==============================================  ======================

Movement is forward-only: an event whose target ranks at or below the current
stage changes nothing, and stages may be skipped (a first order makes a
subscriber a customer). The two exceptions:

* **churn (lapse):** when a customer or advocate has a lifecycle-relevant
  event (any type in :data:`RELEVANT_TYPES`) that occurs :data:`CHURN_AFTER_DAYS`
  or more after their last order, they move to ``churned`` first, caused by that
  event. A change needs a causing event, so a customer who simply goes quiet is
  not moved here; ``churn_risk`` (BG/NBD probability alive) scores them instead.
* **reactivation:** ``order_placed`` while churned moves back to ``customer``.

Events are folded in event-time order (``occurred_at``, ties by ledger
position), so a late event lands where it happened and the history is
recomputed. Each change has a deterministic id (UUIDv5 of customer, causing
event, from and to) so consumers can drop repeats.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import sha1
from typing import NamedTuple

STAGES: tuple[str, ...] = (
    "subscriber",
    "lead",
    "marketing_qualified",
    "sales_qualified",
    "opportunity",
    "customer",
    "advocate",
)
CHURNED = "churned"
ALL_STAGES: tuple[str, ...] = (*STAGES, CHURNED)
RANK: dict[str, int] = {s: i for i, s in enumerate(STAGES)}
CHURN_AFTER_DAYS = 180
_CHURN_AFTER_US = CHURN_AFTER_DAYS * 86_400 * 1_000_000
_CHANGE_NAMESPACE = uuid.UUID("6f1c1d56-4a53-5b8e-9d6e-2f1b8c0f7a31")
_NAMESPACE_BYTES = _CHANGE_NAMESPACE.bytes


class Touch(NamedTuple):
    """The fields of one event that the rules look at (times in epoch microseconds)."""

    position: int
    event_id: str
    type: str
    occurred_us: int
    form_id: str | None = None
    direction: str | None = None
    outcome: str | None = None
    sentiment: str | None = None
    satisfaction: int | None = None

    @property
    def order_key(self) -> tuple[int, int]:
        return (self.occurred_us, self.position)


class Change(NamedTuple):
    """One transition of one customer's stage."""

    change_id: str
    customer_id: str
    from_stage: str | None
    to_stage: str
    event_id: str
    event_position: int
    occurred_us: int


@dataclass(frozen=True)
class Rule:
    type: str
    target: str
    condition: Callable[[Touch], bool]
    describe: str
    needs_stage: str | None = None


RULES: tuple[Rule, ...] = (
    Rule(
        "form_submitted",
        "subscriber",
        lambda t: t.form_id == "newsletter_signup",
        "form_id = newsletter_signup",
    ),
    Rule(
        "form_submitted",
        "lead",
        lambda t: t.form_id in ("contact", "download"),
        "form_id = contact or download",
    ),
    Rule("chat_message", "lead", lambda t: t.direction == "inbound", "direction = inbound"),
    Rule(
        "call_completed",
        "lead",
        lambda t: t.direction == "inbound" and t.outcome == "answered",
        "direction = inbound and outcome = answered",
    ),
    Rule("email_clicked", "marketing_qualified", lambda t: True, "any click"),
    Rule(
        "form_submitted",
        "sales_qualified",
        lambda t: t.form_id == "demo_request",
        "form_id = demo_request",
    ),
    Rule(
        "form_submitted",
        "opportunity",
        lambda t: t.form_id == "quote_request",
        "form_id = quote_request",
    ),
    Rule("order_placed", "customer", lambda t: True, "any order"),
    Rule(
        "social_mention",
        "advocate",
        lambda t: t.sentiment == "positive",
        "sentiment = positive",
        needs_stage="customer",
    ),
    Rule(
        "ticket_resolved",
        "advocate",
        lambda t: t.satisfaction == 5,
        "satisfaction = 5",
        needs_stage="customer",
    ),
)
#: Event types any rule looks at; other events never change a stage.
RELEVANT_TYPES: tuple[str, ...] = tuple(dict.fromkeys(r.type for r in RULES))
_RULES_BY_TYPE: dict[str, tuple[Rule, ...]] = {
    t: tuple(r for r in RULES if r.type == t) for t in RELEVANT_TYPES
}


def change_id(customer_id: str, event_id: str, from_stage: str | None, to_stage: str) -> str:
    """Deterministic id of a transition: the same facts always give the same id.

    UUIDv5 (RFC 4122) of ``customer|event|from|to`` in :data:`_CHANGE_NAMESPACE`, computed
    inline (``uuid.uuid5`` costs several times more, and rebuilds compute one per change).
    """
    digest = bytearray(
        sha1(
            _NAMESPACE_BYTES + f"{customer_id}|{event_id}|{from_stage or ''}|{to_stage}".encode()
        ).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Fold:
    """One customer's stage machine; feed it touches in event-time order."""

    __slots__ = ("changes", "customer_id", "last_key", "last_order_us", "stage")

    def __init__(self, customer_id: str):
        self.customer_id = customer_id
        self.stage: str | None = None
        self.last_order_us: int | None = None
        self.last_key: tuple[int, int] | None = None
        self.changes: list[Change] = []

    def _move(self, touch: Touch, to_stage: str) -> None:
        self.changes.append(
            Change(
                change_id(self.customer_id, touch.event_id, self.stage, to_stage),
                self.customer_id,
                self.stage,
                to_stage,
                touch.event_id,
                touch.position,
                touch.occurred_us,
            )
        )
        self.stage = to_stage

    def step(self, touch: Touch) -> None:
        self.last_key = (touch.occurred_us, touch.position)
        stage = self.stage
        if (
            (stage == "customer" or stage == "advocate")
            and self.last_order_us is not None
            and touch.occurred_us - self.last_order_us >= _CHURN_AFTER_US
        ):
            self._move(touch, CHURNED)
        if touch.type == "order_placed":
            self.last_order_us = touch.occurred_us
            if self.stage == CHURNED:
                self._move(touch, "customer")
                return
        if self.stage == CHURNED:
            return  # only a new order brings a churned customer back (handled above)
        for rule in _RULES_BY_TYPE.get(touch.type, ()):
            if rule.needs_stage is not None and self.stage != rule.needs_stage:
                continue
            current = -1 if self.stage is None else RANK[self.stage]
            if RANK[rule.target] > current and rule.condition(touch):
                self._move(touch, rule.target)


def fold(customer_id: str, touches: Sequence[Touch]) -> Fold:
    """The stage history of one customer from all their relevant touches (any order)."""
    state = Fold(customer_id)
    for touch in sorted(touches, key=lambda t: t.order_key):
        state.step(touch)
    return state
