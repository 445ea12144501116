"""Realistic synthetic touchpoints: customers moving through multi-channel journeys.

Tests, the demo and the benchmarks all feed on this, so it is deterministic (the same
arguments give byte-identical output) and fast (it streams; memory grows with the
number of customers active at one moment, not with the number of events).

The model, in short:

* Each customer has an acquisition moment (about a third already exist when the
  period starts), a window of activity that ends early for those who drop out or go
  quiet, and a heavy-tailed budget of events; the budgets add up to exactly the
  number of valid events asked for.
* A customer lives through episodes: anonymous web sessions, a sign-up (newsletter,
  contact or download form, with consent), campaign emails (sent, opened, clicked,
  bounced), chats, calls, social mentions, demo and quote requests, orders and
  refunds, support tickets, consent changes. Which episodes come depends on the
  customer's segment (anonymous visitor, subscriber, lead, buyer, business buyer)
  and stage.
* Purchasing follows the shape BG/NBD assumes: each buyer has their own purchase
  rate (gamma distributed) while active, and buyers drop out at a random moment.
* Episode times follow a seasonal intensity: hour of day, day of week, a Q4 peak
  with a Black Friday week and a quiet Christmas. Campaign emails go out in bulk on
  Tuesday mornings and Thursday afternoons.
* Output is in arrival order; about 3% of events arrive late (hours to days after
  they occurred), so timelines must be ordered by ``occurred_at``.
* Personal data sits only where the contract encrypts it: identifiers (email, E.164
  phone, name, handles) and free text (form fields, chat text, call notes, ticket
  subjects, refund reasons, social posts). Subjects, titles and URLs stay generic.

Optional noise for the exactly-once and dead-letter paths: a fraction of lines are
exact repeats of a recent line (same ``event_id``), a fraction are realistic
mistakes that the contract rejects. ``events`` counts every line written.
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
import sys
import time
import unicodedata
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import IO, Any

import orjson

from ledger.contract import CHANNEL_OF, CHANNELS

DEFAULT_START = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
DEFAULT_DAYS = 365
#: Share of events that arrive hours or days after they occurred.
LATE_SHARE = 0.03
#: Duplicates repeat one of this many most recent valid lines (a redelivery window).
DUPLICATE_WINDOW = 2048

_MASK64 = (1 << 64) - 1
_SITE = "https://shop.example.com"


class GenerateError(ValueError):
    """Arguments no data set can be generated from; the message names the argument."""


@dataclass(frozen=True)
class Plan:
    """What a run will write: ``events`` lines, of which ``valid`` distinct valid events."""

    customers: int
    events: int
    valid: int
    duplicates: int
    invalid: int
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class Summary:
    """What a run wrote."""

    plan: Plan
    lines: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else float("inf")


def plan(
    customers: int,
    events: int,
    *,
    start: dt.datetime | None = None,
    days: int = DEFAULT_DAYS,
    duplicates: float = 0.0,
    invalid: float = 0.0,
    now: dt.datetime | None = None,
) -> Plan:
    """Check the arguments and work out the exact counts; raises :class:`GenerateError`."""
    if customers < 1:
        raise GenerateError(f"customers: {customers} is too few; expected at least 1")
    if events < 0:
        raise GenerateError(f"events: {events} is negative; expected 0 or more")
    if days < 1:
        raise GenerateError(f"days: {days} is too short; expected at least 1 day")
    for name, share in (("duplicates", duplicates), ("invalid", invalid)):
        if not 0.0 <= share < 1.0 or math.isnan(share):
            raise GenerateError(f"{name}: {share} is not a fraction; expected 0 <= {name} < 1")
    n_dup = round(events * duplicates)
    n_invalid = round(events * invalid)
    n_valid = events - n_dup - n_invalid
    if n_valid < customers:
        raise GenerateError(
            f"events: {events:,} lines leave {n_valid:,} valid events for {customers:,} "
            "customers; every customer needs at least one, so ask for more events, fewer "
            "customers or smaller duplicate/invalid fractions"
        )
    first = DEFAULT_START if start is None else start
    if first.tzinfo is None:
        raise GenerateError(
            f"start: {first.isoformat()} has no timezone; expected e.g. 2025-01-01Z"
        )
    first = first.astimezone(dt.UTC)
    end = first + dt.timedelta(days=days)
    limit = now or dt.datetime.now(dt.UTC)
    if end > limit:
        raise GenerateError(
            f"start/days: the period {first:%Y-%m-%d} to {end:%Y-%m-%d} reaches into the "
            f"future (now is {limit:%Y-%m-%d %H:%M} UTC); choose an earlier start or fewer days"
        )
    return Plan(customers, events, n_valid, n_dup, n_invalid, first, end)


# --------------------------------------------------------------------------- vocabulary

# (weight, country, currency, phone prefix, phone digits after prefix, first names,
#  last names, mail domains)
_LOCALES: list[tuple[float, str, str, str, int, list[str], list[str], list[str]]] = [
    (
        34,
        "DE",
        "EUR",
        "+4915",
        9,
        [
            "Anna",
            "Lena",
            "Jonas",
            "Lukas",
            "Sophie",
            "Maximilian",
            "Jürgen",
            "Sabine",
            "Katrin",
            "Mehmet",
            "Özlem",
            "Paul",
        ],
        [
            "Müller",
            "Schmidt",
            "Schneider",
            "Fischer",
            "Weber",
            "Meyer",
            "Wagner",
            "Becker",
            "Schulz",
            "Hoffmann",
            "Yılmaz",
        ],
        ["gmx.de", "web.de", "t-online.de", "gmail.com", "posteo.de"],
    ),
    (
        20,
        "US",
        "USD",
        "+1",
        10,
        [
            "James",
            "Mary",
            "Robert",
            "Patricia",
            "Michael",
            "Jennifer",
            "Emily",
            "Daniel",
            "Aisha",
            "Carlos",
            "Mei",
            "Tyler",
        ],
        [
            "Smith",
            "Johnson",
            "Williams",
            "Brown",
            "Jones",
            "Garcia",
            "Miller",
            "Davis",
            "Rodriguez",
            "Nguyen",
            "Kim",
        ],
        ["gmail.com", "yahoo.com", "outlook.com", "icloud.com", "aol.com"],
    ),
    (
        12,
        "GB",
        "GBP",
        "+447",
        9,
        [
            "Oliver",
            "George",
            "Amelia",
            "Olivia",
            "Harry",
            "Isla",
            "Siobhan",
            "Rhys",
            "Priya",
            "Callum",
            "Freya",
        ],
        [
            "Smith",
            "Jones",
            "Taylor",
            "Brown",
            "Williams",
            "Wilson",
            "Evans",
            "Thomas",
            "Patel",
            "O'Brien",
            "Davies",
        ],
        ["gmail.com", "hotmail.co.uk", "btinternet.com", "outlook.com"],
    ),
    (
        10,
        "FR",
        "EUR",
        "+336",
        8,
        [
            "Camille",
            "Léa",
            "Hugo",
            "Louis",
            "Chloé",
            "Gabriel",
            "Manon",
            "Théo",
            "Inès",
            "Lucas",
            "Élodie",
        ],
        [
            "Martin",
            "Bernard",
            "Dubois",
            "Thomas",
            "Robert",
            "Richard",
            "Petit",
            "Durand",
            "Lefèvre",
            "Moreau",
        ],
        ["orange.fr", "free.fr", "gmail.com", "laposte.net"],
    ),
    (
        5,
        "NL",
        "EUR",
        "+316",
        8,
        ["Daan", "Emma", "Sem", "Julia", "Lieke", "Bram", "Sanne", "Thijs", "Fleur"],
        ["de", "Jong", "Jansen", "de", "Vries", "van", "den", "Berg", "Bakker", "Visser", "Smit"],
        ["ziggo.nl", "gmail.com", "kpnmail.nl"],
    ),
    (
        5,
        "ES",
        "EUR",
        "+346",
        8,
        ["Lucía", "Hugo", "Martina", "Mateo", "Sofía", "Pablo", "Álvaro", "Carmen", "Javier"],
        ["García", "Fernández", "González", "Rodríguez", "López", "Martínez", "Sánchez", "Pérez"],
        ["gmail.com", "hotmail.es", "telefonica.net"],
    ),
    (
        4,
        "PL",
        "PLN",
        "+48",
        9,
        ["Zofia", "Jakub", "Julia", "Antoni", "Łukasz", "Małgorzata", "Kacper", "Agnieszka"],
        ["Nowak", "Kowalski", "Wiśniewski", "Wójcik", "Kamiński", "Lewandowski", "Zieliński"],
        ["wp.pl", "onet.pl", "gmail.com", "interia.pl"],
    ),
    (
        3,
        "SE",
        "SEK",
        "+467",
        8,
        ["Elsa", "Oscar", "Alice", "William", "Maja", "Lucas", "Björn", "Åsa"],
        ["Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Öberg"],
        ["telia.com", "gmail.com", "bredband.net"],
    ),
    (
        3,
        "CH",
        "CHF",
        "+417",
        8,
        ["Noah", "Mia", "Luca", "Lea", "Leon", "Laura", "Nico", "Seraina"],
        ["Müller", "Meier", "Schmid", "Keller", "Weber", "Huber", "Brunner"],
        ["bluewin.ch", "gmx.ch", "gmail.com"],
    ),
    (
        4,
        "JP",
        "JPY",
        "+8190",
        8,
        ["Haruto", "Yui", "Sota", "Hina", "Ren", "Aoi", "Yuto", "Sakura"],
        ["Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto"],
        ["gmail.com", "yahoo.co.jp", "docomo.ne.jp"],
    ),
]
_LOCALE_CUM: list[float] = []
for _w, *_ in _LOCALES:
    _LOCALE_CUM.append((_LOCALE_CUM[-1] if _LOCALE_CUM else 0.0) + _w)
#: Decimal places of each currency used (JPY has none).
_MINOR_UNITS = {"JPY": 0}
#: Relative price level: a basket costs this many units per EUR.
_PRICE_LEVEL = {
    "EUR": 1.0,
    "USD": 1.1,
    "GBP": 0.85,
    "PLN": 4.3,
    "SEK": 11.4,
    "CHF": 0.95,
    "JPY": 160.0,
}
_CROSS_BORDER = ["EUR", "USD", "GBP"]

_PRODUCTS = [
    f"{a} {b}"
    for a in ("Trail", "Urban", "Classic", "Merino", "Alpine", "Coastal", "Studio", "Nordic")
    for b in ("Runner", "Backpack", "Jacket", "Hoodie", "Bottle", "Beanie")
]
_BLOG = [
    "how-to-choose-running-shoes",
    "packing-list-for-a-weekend-hike",
    "caring-for-merino-wool",
    "our-recycled-materials",
    "layering-for-winter",
    "five-trails-near-the-city",
    "behind-the-scenes-at-the-workshop",
]
_PAGES: list[tuple[str, str]] = [
    (f"{_SITE}/", "Home"),
    (f"{_SITE}/pricing", "Pricing and delivery"),
    (f"{_SITE}/about", "About us"),
    (f"{_SITE}/sale", "Sale"),
    (f"{_SITE}/stores", "Find a store"),
    (f"{_SITE}/help/returns", "Returns and refunds"),
    *[(f"{_SITE}/blog/{slug}", slug.replace("-", " ").capitalize()) for slug in _BLOG],
    *[(f"{_SITE}/products/{p.lower().replace(' ', '-')}", p) for p in _PRODUCTS],
]
_PRODUCT_PAGES = [page for page in _PAGES if "/products/" in page[0]]
_REFERRERS = [
    None,
    None,
    "https://www.google.com/",
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://duckduckgo.com/",
    "https://www.instagram.com/",
    "https://www.facebook.com/",
    "https://t.co/",
    "https://www.linkedin.com/",
]
_NETWORKS = ["x", "facebook", "instagram", "linkedin", "tiktok", "reddit", "other"]
_NETWORK_WEIGHTS = [25, 15, 25, 8, 12, 10, 5]
_NETWORK_URL = {
    "x": "https://x.com/i/status/{n}",
    "facebook": "https://www.facebook.com/permalink/{n}",
    "instagram": "https://www.instagram.com/p/{n}/",
    "linkedin": "https://www.linkedin.com/feed/update/urn:li:activity:{n}/",
    "tiktok": "https://www.tiktok.com/video/{n}",
    "reddit": "https://www.reddit.com/r/BuyItForLife/comments/{n}/",
    "other": "https://forum.example.org/t/{n}",
}
_SOCIAL_TEXT = {
    "positive": [
        "Loving my new {product} from @shopexample, best purchase this year! — {first}",
        "Shoutout to @shopexample support, {first} here: sorted my order in minutes",
        "@shopexample the {product} survived a week in the Alps. Impressed. {handle}",
    ],
    "neutral": [
        "Has anyone tried the {product} from @shopexample? Thinking about it. {handle}",
        "@shopexample do you ship to {country}? asking for {first}",
        "Saw @shopexample's {product} in a store today",
    ],
    "negative": [
        "@shopexample still waiting for my refund, {first} {last}, order {order}. Not happy.",
        "The {product} from @shopexample fell apart after two weeks. {handle}",
        "@shopexample your support never answered me. Email {email}, fix it.",
    ],
}
_CHAT_IN = [
    "Hi, this is {first} {last}. Where is my order {order}?",
    "Hello! Can you send the invoice for {order} to {email}?",
    "Do you have the {product} in a medium? Please call me on {phone}.",
    "I'd like to change my delivery address to {street}, please.",
    "Hi, I'm {first}. Is the {product} waterproof?",
    "My discount code does not work at checkout, my email is {email}",
    "Can I return the {product}? I bought it last week.",
    "Thanks, that helps!",
]
_CHAT_OUT = [
    "Hi {first}, thanks for reaching out! Let me check that for you.",
    "I've found your order {order}; it left our warehouse yesterday.",
    "Sure, I've sent it to {email}. Anything else I can help with?",
    "The {product} is in stock in all sizes right now.",
    "I've updated the address on your account, {first}.",
    "You can start a return at {site}/help/returns within 30 days.",
]
_STREETS = [
    "Hauptstraße 12",
    "12 High Street",
    "221B Baker Street",
    "Rue de Rivoli 8",
    "Main St 455",
]
_CALL_TOPICS = [
    "a late delivery",
    "the annual plan",
    "a bulk order for the team",
    "a damaged item",
    "the loyalty programme",
    "sizing of the {product}",
    "an invoice question",
]
_CALL_NOTES = [
    "Spoke with {first} {last} about {topic}. Call back on {phone} next week.",
    "{first} asked about {topic}; sent details to {email}.",
    "Discussed {topic} with {first}. Happy with the outcome.",
    "{first} {last} wants a quote for {topic}; follow up by email ({email}).",
]
_TICKET_SUBJECTS = [
    "Order {order} arrived damaged",
    "Cannot log in with {email}",
    "Refund for order {order} not received",
    "Wrong size delivered ({product})",
    "Please update my phone number to {phone}",
    "Invoice address for {first} {last} is wrong",
    "Question about the warranty of the {product}",
]
_REFUND_REASONS = [
    "Item arrived damaged",
    "Wrong size, customer {first} {last} returned it",
    "Changed my mind",
    "Parcel lost in transit; customer reachable at {phone}",
    "Duplicate order",
    None,
]
_BOUNCE_REASONS = {
    "hard": ["550 5.1.1 mailbox does not exist", "550 5.1.2 domain not found"],
    "soft": ["452 4.2.2 mailbox full", "421 4.7.0 try again later", "451 greylisted"],
}
_COMPANIES = ["Acme GmbH", "Northwind Ltd", "Globex SAS", "Initech Inc.", "Umbrella BV", "Hooli AG"]

#: Campaign themes by month (1-12), rotated weekly.
_THEMES = {
    1: ["january_sale", "new_year_goals"],
    2: ["winter_clearance", "weekly_digest"],
    3: ["spring_collection", "weekly_digest"],
    4: ["easter_offers", "new_arrivals"],
    5: ["weekly_digest", "trail_season"],
    6: ["summer_collection", "weekly_digest"],
    7: ["summer_sale", "new_arrivals"],
    8: ["back_to_school", "summer_sale"],
    9: ["autumn_collection", "weekly_digest"],
    10: ["new_arrivals", "layering_guide"],
    11: ["early_black_friday", "weekly_digest"],
    12: ["holiday_gift_guide", "last_minute_gifts"],
}
_SUBJECTS = {
    "january_sale": "Up to 50% off: the January sale is on",
    "new_year_goals": "Gear for your new year goals",
    "winter_clearance": "Last chance: winter clearance",
    "weekly_digest": "This week at Shop Example",
    "spring_collection": "The spring collection has landed",
    "easter_offers": "Easter offers inside",
    "new_arrivals": "New arrivals you will like",
    "trail_season": "Trail season is here",
    "summer_collection": "Meet the summer collection",
    "summer_sale": "Summer sale: extra 20% off",
    "back_to_school": "Back to school essentials",
    "autumn_collection": "Autumn layers, ready to ship",
    "layering_guide": "How to layer like a pro",
    "early_black_friday": "Early access: Black Friday starts now",
    "black_friday": "Black Friday: our biggest sale of the year",
    "cyber_monday": "Cyber Monday: final hours",
    "holiday_gift_guide": "The holiday gift guide",
    "last_minute_gifts": "Last-minute gifts, delivered before Christmas",
}

_SOURCE_OF: dict[str, str] = {
    "page_viewed": "web-tracker",
    "form_submitted": "web-forms",
    "email_sent": "esp-mailer",
    "email_opened": "esp-mailer",
    "email_clicked": "esp-mailer",
    "email_bounced": "esp-mailer",
    "chat_message": "chat-widget",
    "call_completed": "telephony",
    "social_mention": "social-listening",
    "order_placed": "shop",
    "order_refunded": "shop",
    "ticket_opened": "helpdesk",
    "ticket_resolved": "helpdesk",
    "consent_changed": "consent-manager",
}

_META = {etype: (CHANNEL_OF[etype], source) for etype, source in _SOURCE_OF.items()}

# Segments: what a customer will become, if the budget lets them.
ANONYMOUS, SUBSCRIBER, LEAD, BUYER, BUSINESS = range(5)
# Stages: how far they are.
_ANON, _KNOWN = 0, 1


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


#: Names folded to what an email address or handle can hold, e.g. "Jürgen" -> "jurgen".
_FOLDED = {name: _ascii(name) for locale in _LOCALES for names in locale[5:7] for name in names}


def _mix(x: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True, slots=True)
class _Profile:
    country: str
    currency: str
    first: str
    last: str
    name: str
    email: str
    phone: str
    anonymous_id: str
    user_id: str
    handle: str


def _profile(seed: int, index: int) -> _Profile:
    """A customer's personal data, a pure function of (seed, index)."""
    h = _mix(_mix(seed & _MASK64) ^ index)
    pick = (h & 0xFFFF) / 0x10000 * _LOCALE_CUM[-1]
    _, country, currency, prefix, digits, firsts, lasts, domains = _LOCALES[
        bisect_right(_LOCALE_CUM, pick)
    ]
    h2 = _mix(h)
    first = firsts[(h >> 16) % len(firsts)]
    last = lasts[(h >> 24) % len(lasts)]
    number = str(h2 % 10**digits).zfill(digits)
    if prefix == "+1":  # NANP: area codes and exchanges never start with 0 or 1
        number = f"{2 + h2 % 8}{number[1:3]}{2 + (h2 >> 8) % 8}{number[4:]}"
    style = (h >> 32) % 4
    a_first, a_last = _FOLDED[first], _FOLDED[last]
    if style == 0:
        local = f"{a_first}.{a_last}"
    elif style == 1:
        local = f"{a_first}{a_last}{index % 100}"
    elif style == 2:
        local = f"{a_first[0]}{a_last}"
    else:
        local = f"{a_first}_{index}"
    return _Profile(
        country=country,
        currency=currency,
        first=first,
        last=last,
        name=f"{first} {last}",
        email=f"{local}@{domains[(h >> 40) % len(domains)]}",
        phone=prefix + number,
        anonymous_id=f"anon_{h2:016x}",
        user_id=f"usr_{index:06d}",
        handle=f"@{a_first}{a_last[:6]}{(h >> 48) % 1000}",
    )


# --------------------------------------------------------------------------- time


_HOUR_OF_DAY = [
    0.15, 0.1, 0.07, 0.05, 0.05, 0.08, 0.2, 0.45, 0.75, 0.95, 1.0, 1.05,
    1.1, 1.05, 1.0, 1.0, 1.0, 1.05, 1.15, 1.3, 1.35, 1.2, 0.8, 0.4,
]  # fmt: skip
_DAY_OF_WEEK = [1.05, 1.1, 1.1, 1.05, 1.0, 0.8, 0.85]  # Monday first
#: Bulk campaign sends: weekday -> hour (UTC).
_SEND_HOUR = {1: 9, 3: 17}
_MONTH = [0.9, 0.92, 1.0, 1.0, 1.0, 0.95, 0.85, 0.85, 1.0, 1.05, 1.35, 1.5]


def _black_friday(year: int) -> dt.date:
    first = dt.date(year, 11, 1)
    thursday = first + dt.timedelta(days=(3 - first.weekday()) % 7 + 21)
    return thursday + dt.timedelta(days=1)


def _day_factor(day: dt.date) -> float:
    factor = _MONTH[day.month - 1] * _DAY_OF_WEEK[day.weekday()]
    offset = (day - _black_friday(day.year)).days
    if -1 <= offset <= 3:  # Thursday to Cyber Monday
        factor *= 2.2
    if day.month == 12 and 24 <= day.day <= 26:
        factor *= 0.5
    return factor


def _theme(day: dt.date) -> str:
    offset = (day - _black_friday(day.year)).days
    if 0 <= offset <= 2:
        return "black_friday"
    if offset == 3:
        return "cyber_monday"
    themes = _THEMES[day.month]
    return themes[day.isocalendar()[1] % len(themes)]


class _Clock:
    """The period's seasonal intensity, and fast formatting of its timestamps."""

    def __init__(self, start: dt.datetime, end: dt.datetime):
        self.t0 = int(start.timestamp())
        self.t_end = int(end.timestamp())
        self.hours = (self.t_end - self.t0 + 3599) // 3600
        cum: list[float] = []
        total = 0.0
        day_factor = 0.0
        day_of: dt.date | None = None
        for hour in range(self.hours):
            moment = start + dt.timedelta(hours=hour)
            if moment.date() != day_of:
                day_of = moment.date()
                day_factor = _day_factor(day_of)
            total += day_factor * _HOUR_OF_DAY[moment.hour]
            cum.append(total)
        self.cum = cum
        self.total = total
        first_day = dt.datetime.fromtimestamp(self.t0 - self.t0 % 86400, dt.UTC)
        self.day0 = int(first_day.timestamp())
        n_days = (self.t_end - self.day0) // 86400 + 2
        days = [(first_day + dt.timedelta(days=d)).date() for d in range(n_days)]
        self.day_prefix = [f"{d.isoformat()}T" for d in days]
        self.weekday = [d.weekday() for d in days]
        self.themes = [_theme(d) for d in days]
        self.years_weeks = [f"{d.isocalendar()[0]}w{d.isocalendar()[1]:02d}" for d in days]
        self.hms = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86400)]

    def at(self, x: float) -> int:
        """The moment at seasonal position ``x`` (0 .. total)."""
        cum = self.cum
        hour = bisect_right(cum, x)
        if hour >= self.hours:
            return self.t_end - 1
        before = cum[hour - 1] if hour else 0.0
        width = cum[hour] - before
        frac = (x - before) / width if width > 0 else 0.0
        return min(self.t0 + hour * 3600 + int(frac * 3600), self.t_end - 1)

    def iso(self, t: int) -> str:
        rel = t - self.day0
        return self.day_prefix[rel // 86400] + self.hms[rel % 86400]

    def next_send(self, t: int) -> int | None:
        """The next bulk campaign send (Tuesday 09:00 or Thursday 17:00 UTC) at or after ``t``."""
        day = (t - self.day0) // 86400
        for d in range(day, min(day + 8, len(self.weekday))):
            hour = _SEND_HOUR.get(self.weekday[d])
            if hour is not None:
                send = self.day0 + d * 86400 + hour * 3600
                if send >= t:
                    return send if send < self.t_end else None
        return None

    def campaign(self, t: int) -> tuple[str, str]:
        day = (t - self.day0) // 86400
        theme = self.themes[day]
        return f"cmp_{self.years_weeks[day]}_{theme}", _SUBJECTS[theme]


# --------------------------------------------------------------------------- customers


class _Customer:
    """What a customer's journey needs between two episodes."""

    __slots__ = (
        "basket",
        "bounced",
        "buy_rate",
        "can_email",
        "cid",
        "demo",
        "index",
        "last_order",
        "last_t",
        "mood",
        "open_rate",
        "orders",
        "p",
        "per_episode",
        "prof",
        "quote",
        "remaining",
        "segment",
        "sessions",
        "stage",
        "we",
        "ws",
    )

    def __init__(
        self, index: int, remaining: int, ws: float, we: float, segment: int, prof: _Profile
    ):
        self.index = index
        self.prof = prof
        self.cid = f"cus_{index:06d}"
        self.remaining = remaining
        self.ws = ws
        self.we = we
        self.segment = segment
        self.stage = _ANON
        self.p = 0.0
        self.last_t = 0
        self.sessions = 0
        self.orders = 0
        self.last_order: tuple[str, int, str] | None = None
        self.can_email = False
        self.bounced = False
        self.demo = False
        self.quote = False
        self.buy_rate = 0.0
        self.basket = 0.0
        self.open_rate = 0.0
        self.mood = 0.0
        self.per_episode = 3.0


#: One event of an episode: (occurred_at seconds, type, identifiers, payload).
_Touch = tuple[int, str, dict[str, str] | None, dict[str, Any]]

_SEGMENTS_BY_BUDGET = [
    (2, [0.75, 0.15, 0.0, 0.10, 0.0]),
    (8, [0.30, 0.30, 0.15, 0.22, 0.03]),
    (1 << 62, [0.08, 0.27, 0.20, 0.38, 0.07]),
]
_EPISODES = [
    "email",
    "web",
    "chat",
    "call",
    "social",
    "demo",
    "quote",
    "order",
    "refund",
    "ticket",
    "consent",
]


class _Journeys:
    """Simulates every customer and yields valid events in arrival order."""

    def __init__(self, p: Plan, seed: int):
        self.plan = p
        self.seed = seed
        # A string seed goes through SHA-512: every integer, negative ones too, its own stream.
        self.rng = Random(f"ledger-generate:{seed}")
        self.random = self.rng.random
        self.clock = _Clock(p.start, p.end)
        self.counter = 0
        self.ids = dict.fromkeys(("ord", "tkt", "conv", "call"), 0)
        self._plan_customers()

    # ----------------------------------------------------------------- population

    def _plan_customers(self) -> None:
        # Arrays, not lists: a million customers' plans take 24 MB instead of 100.
        rng, n, total = self.rng, self.plan.customers, self.clock.total
        existing = 0.3
        starts = array(
            "d", sorted(0.0 if rng.random() < existing else rng.random() * total for _ in range(n))
        )
        ends = array("d")
        weights = array("d")
        for ws in starts:
            # Some stay to the end of the period, the others drop out (or go quiet) on the way.
            stay = rng.random() < 0.45
            we = total if stay else ws + (total - ws) * rng.uniform(0.05, 0.9)
            ends.append(we)
            weights.append(rng.lognormvariate(0.0, 1.0) * ((we - ws) / total + 0.05))
        extra = self.plan.valid - n
        scale = extra / sum(weights)
        budgets = array("q", (1 + int(w * scale) for w in weights))
        del weights
        for _ in range(self.plan.valid - sum(budgets)):
            budgets[self._below(n)] += 1
        self.starts, self.ends, self.budgets = starts, ends, budgets

    def _activate(self, index: int) -> _Customer:
        rng = self.rng
        budget = self.budgets[index]
        for limit, weights in _SEGMENTS_BY_BUDGET:
            if budget <= limit:
                segment = rng.choices(range(5), weights)[0]
                break
        prof = _profile(self.seed, index + 1)
        c = _Customer(index + 1, budget, self.starts[index], self.ends[index], segment, prof)
        c.open_rate = rng.betavariate(2, 4) if rng.random() < 0.85 else 0.0
        c.mood = rng.gauss(0.0, 1.0)
        if segment in (BUYER, BUSINESS):
            # Heterogeneous purchase rates while active, as BG/NBD assumes (gamma mixing).
            c.buy_rate = rng.gammavariate(0.8, 1.0) * (1.6 if segment == BUYER else 0.8)
        elif segment in (SUBSCRIBER, LEAD):
            c.buy_rate = rng.gammavariate(0.5, 0.2)
        level = _PRICE_LEVEL[prof.currency]
        base = 2500.0 if segment == BUSINESS else 70.0
        c.basket = rng.lognormvariate(math.log(base), 0.6) * level
        return c

    # ----------------------------------------------------------------- driving

    def valid_lines(self) -> Iterator[bytes]:
        heap: list[tuple[int, int, Any]] = []
        self.heap = heap
        pop, push = heapq.heappop, heapq.heappush
        starts, clock, n = self.starts, self.clock, self.plan.customers
        nxt = 0
        next_start = clock.at(starts[0])
        while True:
            while nxt < n and (not heap or next_start <= heap[0][0]):
                c = self._activate(nxt)
                nxt += 1
                next_start = clock.at(starts[nxt]) if nxt < n else 1 << 62
                self.counter += 1
                push(heap, (self._advance(c), self.counter, c))
            if not heap:
                return
            t, _, item = pop(heap)
            if item.__class__ is bytes:
                yield item
            else:
                self._episode(item, t)

    def _advance(self, c: _Customer) -> int:
        """Move the customer on to the moment of their next episode."""
        if c.p == 0.0 and c.ws > 0.0:
            c.p = 1e-12  # a newly acquired customer's first episode is the acquisition
        else:
            # The next of the remaining episodes' sorted uniform positions in the window.
            episodes_left = max(1.0, c.remaining / c.per_episode)
            c.p = 1.0 - (1.0 - c.p) * self.rng.random() ** (1.0 / episodes_left)
        t = self.clock.at(c.ws + c.p * (c.we - c.ws))
        if c.last_t and t < c.last_t + 60:
            t = min(c.last_t + 60, self.clock.t_end - 1)
        return t

    def _episode(self, c: _Customer, t: int) -> None:
        events = self._build(c, t)
        if len(events) > c.remaining:
            events = events[: c.remaining]
        c.remaining -= len(events)
        c.per_episode = 0.7 * c.per_episode + 0.3 * len(events)
        # The next episode may begin while this one's slow tail (an email opened days later,
        # a ticket resolved next week) is still pending, as in life; only a session's first
        # hour keeps the customer busy.
        c.last_t = min(self._emit(c.cid, events), t + 3600)
        if c.remaining > 0:
            self.counter += 1
            heapq.heappush(self.heap, (self._advance(c), self.counter, c))

    def _emit(self, customer_id: str, events: list[_Touch]) -> int:
        """Turn an episode's events into lines, queued by arrival time; returns the last time."""
        rng = self.rng
        random, getrandbits = rng.random, rng.getrandbits
        clock, heap, push, dumps = self.clock, self.heap, heapq.heappush, orjson.dumps
        t_last, day0, prefix, hms = clock.t_end - 1, clock.day0, clock.day_prefix, clock.hms
        counter = self.counter
        t = 0
        for t, etype, ident, payload in events:
            if t > t_last:
                t = t_last
            h = f"{getrandbits(128) & _UUID_CLEAR | _UUID_SET:032x}"
            rel = t - day0
            channel, source = _META[etype]
            if ident:
                doc = {
                    "event_id": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                    "customer_id": customer_id,
                    "channel": channel,
                    "type": etype,
                    "occurred_at": prefix[rel // 86400] + hms[rel % 86400],
                    "source": source,
                    "identifiers": ident,
                    "payload": payload,
                    "schema_version": 1,
                }
            else:
                doc = {
                    "event_id": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                    "customer_id": customer_id,
                    "channel": channel,
                    "type": etype,
                    "occurred_at": prefix[rel // 86400] + hms[rel % 86400],
                    "source": source,
                    "payload": payload,
                    "schema_version": 1,
                }
            r = random()
            arrival = t + (_late_delay(rng) if r < LATE_SHARE else int(r * 30))
            counter += 1
            push(heap, (arrival, counter, dumps(doc)))
        self.counter = counter
        return t

    def _weighted(self, options: Sequence[Any], weights: Sequence[float]) -> Any:
        """One of ``options`` with the given weights (random.choices is slower for one)."""
        r = self.random() * sum(weights)
        chosen = None
        for option, weight in zip(options, weights, strict=True):
            if weight > 0.0:
                chosen = option  # rounding can leave r >= 0 after the last: keep the last
                r -= weight
                if r < 0.0:
                    break
        return chosen

    def _pick(self, seq: list[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def _int(self, low: int, high: int) -> int:
        """A uniform integer in [low, high] (random.randint is several times slower)."""
        return low + int(self.random() * (high - low + 1))

    def _below(self, n: int) -> int:
        return int(self.random() * n)

    def _next_id(self, kind: str) -> str:
        self.ids[kind] += 1
        return f"{kind}_{self.ids[kind]:07d}"

    # ----------------------------------------------------------------- episodes

    def _build(self, c: _Customer, t: int) -> list[_Touch]:
        rng = self.rng
        prof = c.prof
        if c.stage == _ANON:
            if c.segment != ANONYMOUS and c.sessions and rng.random() < 0.45:
                return self._signup(c, prof, t)
            if c.segment == ANONYMOUS and rng.random() < 0.04:
                return self._social(c, prof, t)
            return self._session(c, prof, t, known=False)
        seg = c.segment
        weights = [
            (6.0 if seg == SUBSCRIBER else 3.0) if c.can_email else 0.0,  # email
            3.0,  # web
            0.35 if c.orders else 0.2,  # chat
            1.5 if seg in (LEAD, BUSINESS) else 0.25,  # call
            0.4 if c.orders else 0.3,  # social
            (1.2 if seg == BUSINESS else 0.6) if seg in (LEAD, BUSINESS) and not c.demo else 0.0,
            1.0 if c.demo and not c.quote else 0.0,  # quote
            self._order_weight(c),
            0.08 if c.last_order else 0.0,  # refund: returns of a few percent of orders
            0.45 if c.orders else 0.08,  # ticket
            0.12,  # consent
        ]
        kind = self._weighted(_EPISODES, weights)
        builder: Callable[[_Customer, _Profile, int], list[_Touch]] = getattr(self, f"_{kind}")
        return builder(c, prof, t)

    @staticmethod
    def _order_weight(c: _Customer) -> float:
        if c.segment == BUYER:
            return c.buy_rate if c.orders else 2.5
        if c.segment == BUSINESS:
            if c.orders:
                return c.buy_rate
            return 2.5 if c.quote else 0.05
        return c.buy_rate * (4.0 if c.quote else 1.0)

    def _fill(self, template: str, c: _Customer, prof: _Profile) -> str:
        order = c.last_order[0] if c.last_order else f"ord_{self._int(1, 999_999):07d}"
        return template.format(
            first=prof.first,
            last=prof.last,
            email=prof.email,
            phone=prof.phone,
            handle=prof.handle,
            country=prof.country,
            order=order,
            product=self._pick(_PRODUCTS),
            street=self._pick(_STREETS),
            company=self._pick(_COMPANIES),
            site=_SITE,
        )

    def _session(
        self,
        c: _Customer,
        prof: _Profile,
        t: int,
        known: bool = True,
        landing: tuple[str, str] | None = None,
        pages: int = 0,
    ) -> list[_Touch]:
        rng = self.rng
        n = pages or min(1 + int(rng.expovariate(0.45)), 12)
        ident = {"anonymous_id": prof.anonymous_id}
        if known and c.stage:
            ident["user_id"] = prof.user_id
        referrer = None if landing else self._pick(_REFERRERS)
        out: list[_Touch] = []
        for i in range(n):
            url, title = landing if (landing and i == 0) else self._pick(_PAGES)
            duration = int(rng.expovariate(1 / 35_000))
            payload: dict[str, Any] = {"url": url, "title": title, "duration_ms": duration}
            if referrer:
                payload["referrer"] = referrer
            out.append((t, "page_viewed", ident, payload))
            referrer = url
            t += duration // 1000 + self._int(1, 15)
        c.sessions += 1
        return out

    def _web(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        return self._session(c, prof, t)

    def _form(self, c: _Customer, prof: _Profile, t: int, form_id: str) -> _Touch:
        fields: dict[str, str] = {"email": prof.email}
        ident = {"email": prof.email, "name": prof.name, "anonymous_id": prof.anonymous_id}
        if form_id == "newsletter_signup":
            fields["first_name"] = prof.first
        else:
            fields["name"] = prof.name
            fields["company"] = self._pick(_COMPANIES)
        if form_id == "contact":
            fields["message"] = self._fill(self._pick(_CHAT_IN), c, prof)
        elif form_id in ("demo_request", "quote_request"):
            fields["phone"] = prof.phone
            ident["phone"] = prof.phone
            fields["team_size"] = self._pick(["1-10", "11-50", "51-200", "200+"])
            if form_id == "quote_request":
                fields["message"] = f"Quote for {self._int(10, 500)} x {self._pick(_PRODUCTS)}"
        path = form_id.replace("_", "-")
        return (
            t,
            "form_submitted",
            ident,
            {"form_id": form_id, "url": f"{_SITE}/{path}", "fields": fields},
        )

    def _signup(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        if c.segment == BUYER and rng.random() < 0.4:
            c.stage = _KNOWN  # guest checkout: the first order is the sign-up
            return self._order(c, prof, t)
        if c.segment in (SUBSCRIBER, BUYER):
            form_id = "newsletter_signup"
        else:
            form_id = "download" if rng.random() < 0.5 else "contact"
        out = self._session(c, prof, t, known=False, pages=self._int(1, 3))
        t = out[-1][0] + self._int(5, 90)
        out.append(self._form(c, prof, t, form_id))
        c.stage = _KNOWN
        if form_id == "newsletter_signup" or rng.random() < 0.6:
            consent = {"purpose": "email_marketing", "status": "granted", "basis": "consent"}
            out.append((t + 1, "consent_changed", {"email": prof.email}, consent))
            c.can_email = True
        return out

    def _email(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng, clock = self.rng, self.clock
        send = clock.next_send(t)
        if send is None:
            return self._session(c, prof, t)
        campaign, subject = clock.campaign(send)
        send += self._below(3600)  # a bulk send takes a while to get through
        message = f"msg_{rng.getrandbits(64):016x}"
        ident = {"email": prof.email}
        ids = {"message_id": message, "campaign_id": campaign}
        out: list[_Touch] = [(send, "email_sent", ident, {**ids, "subject": subject})]
        r = rng.random()
        if r < 0.02:
            hard = r < 0.006
            kind = "hard" if hard else "soft"
            bounce = {"message_id": message, "bounce_type": kind}
            bounce["reason"] = self._pick(_BOUNCE_REASONS[kind])
            out.append((send + self._int(2, 120), "email_bounced", ident, bounce))
            if hard:
                c.can_email = False
                c.bounced = True
        elif rng.random() < c.open_rate:
            opened = send + int(min(rng.expovariate(1 / 7200), 4 * 86400))
            out.append((opened, "email_opened", ident, ids))
            if rng.random() < 0.3:
                url, title = self._pick(_PRODUCT_PAGES)
                url = f"{url}?utm_source=newsletter&utm_campaign={campaign}"
                clicked = opened + self._int(3, 120)
                out.append((clicked, "email_clicked", ident, {**ids, "url": url}))
                out += self._session(c, prof, clicked + 2, landing=(url, title))
        return out

    def _chat(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        conversation = self._next_id("conv")
        agent = f"agent_{self._int(1, 24):02d}"
        if c.stage:
            ident = {"email": prof.email, "name": prof.name}
        else:
            ident = {"anonymous_id": prof.anonymous_id}
        out: list[_Touch] = []
        for i in range(self._int(2, 6)):
            inbound = i % 2 == 0
            text = self._fill(self._pick(_CHAT_IN if inbound else _CHAT_OUT), c, prof)
            payload = {"conversation_id": conversation, "direction": "inbound", "text": text}
            if not inbound:
                payload["direction"] = "outbound"
                payload["agent_id"] = agent
            out.append((t, "chat_message", ident, payload))
            t += self._int(8, 180)
        return out

    def _business_hours(self, t: int) -> int:
        """Calls happen 08:00-18:00: move a moment outside them to the next opening."""
        since = (t - self.clock.day0) % 86400
        hour = since // 3600
        if 8 <= hour < 18:
            return t
        moved = t - since + (8 + hour % 10) * 3600 + self._below(3600)
        return moved if moved >= t else moved + 86400

    def _call(
        self, c: _Customer, prof: _Profile, t: int, outbound: bool | None = None
    ) -> list[_Touch]:
        rng = self.rng
        t = self._business_hours(t)
        if outbound is None:
            outbound = rng.random() < (0.6 if c.segment in (LEAD, BUSINESS) else 0.3)
        if outbound:
            outcome = self._weighted(_OUTCOMES, [55, 18, 12, 8, 7])
        else:
            outcome = self._weighted(_OUTCOMES, [80, 0, 14, 0, 6])
        if outcome == "answered":
            duration = min(int(rng.lognormvariate(5.5, 0.8)), 7200)
        elif outcome == "voicemail":
            duration = self._int(15, 90)
        else:
            duration = 0
        payload: dict[str, Any] = {
            "call_id": self._next_id("call"),
            "direction": "outbound" if outbound else "inbound",
            "duration_seconds": duration,
            "outcome": outcome,
        }
        if outcome == "answered" and rng.random() < 0.75:
            topic = self._pick(_CALL_TOPICS)
            payload["notes"] = self._fill(
                self._pick(_CALL_NOTES).replace("{topic}", topic), c, prof
            )
        return [(t, "call_completed", {"phone": prof.phone, "name": prof.name}, payload)]

    def _social(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        score = c.mood + (0.6 if c.orders >= 3 else 0.0) + rng.gauss(0.0, 0.5)
        sentiment = "positive" if score > 0.6 else "negative" if score < -1.2 else "neutral"
        network = self._weighted(_NETWORKS, _NETWORK_WEIGHTS)
        payload: dict[str, Any] = {
            "network": network,
            "url": _NETWORK_URL[network].format(n=rng.getrandbits(40)),
            "text": self._fill(self._pick(_SOCIAL_TEXT[sentiment]), c, prof),
        }
        if rng.random() < 0.9:  # social listening tools do not always score sentiment
            payload["sentiment"] = sentiment
        return [(t, "social_mention", {"social_handle": prof.handle}, payload)]

    def _demo(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        c.demo = True
        out = self._session(c, prof, t, pages=self._int(1, 3))
        t = out[-1][0] + self._int(10, 120)
        out.append(self._form(c, prof, t, "demo_request"))
        if rng.random() < 0.7:  # sales calls back within a few days
            out += self._call(c, prof, t + self._int(3600, 3 * 86400), outbound=True)
        return out

    def _quote(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        c.quote = True
        out = self._session(c, prof, t, pages=self._int(1, 2))
        out.append(self._form(c, prof, out[-1][0] + self._int(10, 120), "quote_request"))
        return out

    def _order(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        out: list[_Touch] = []
        if rng.random() < 0.8:  # most orders come after browsing the shop
            out = self._session(c, prof, t, landing=self._pick(_PRODUCT_PAGES))
            out[0][3]["referrer"] = self._pick(_REFERRERS) or f"{_SITE}/"
            t = out[-1][0] + self._int(5, 60)
            for url, title in ((f"{_SITE}/cart", "Your cart"), (f"{_SITE}/checkout", "Checkout")):
                page = {"url": url, "title": title, "duration_ms": self._int(4000, 90_000)}
                out.append((t, "page_viewed", out[0][2], page))
                t += self._int(10, 120)
        currency = prof.currency if rng.random() > 0.03 else self._pick(_CROSS_BORDER)
        value = c.basket * rng.lognormvariate(0.0, 0.35)
        value *= _PRICE_LEVEL[currency] / _PRICE_LEVEL[prof.currency]
        minor = _to_minor(value, currency, rng)
        order_id = self._next_id("ord")
        ident = {"email": prof.email, "name": prof.name}
        if rng.random() < 0.5:
            ident["phone"] = prof.phone
        items = min(1 + int(rng.expovariate(0.8)), 20)
        if c.segment == BUSINESS:
            items *= self._int(5, 50)
        total = {"amount": _amount(minor, currency), "currency": currency}
        out.append(
            (t, "order_placed", ident, {"order_id": order_id, "total": total, "items": items})
        )
        c.orders += 1
        c.last_order = (order_id, minor, currency)
        return out

    def _refund(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        assert c.last_order is not None
        order_id, minor, currency = c.last_order
        out: list[_Touch] = []
        if rng.random() < 0.4:
            subject = f"Refund request for order {order_id} ({prof.name})"
            opened = {"ticket_id": self._next_id("tkt"), "subject": subject, "priority": "normal"}
            out.append((t, "ticket_opened", {"email": prof.email}, opened))
            t += self._int(3600, 3 * 86400)
        if rng.random() < 0.3:
            minor = max(1, int(minor * rng.uniform(0.2, 0.8)))
        payload: dict[str, Any] = {
            "order_id": order_id,
            "amount": {"amount": _amount(minor, currency), "currency": currency},
        }
        reason = self._pick(_REFUND_REASONS)
        if reason:
            payload["reason"] = self._fill(reason, c, prof)
        out.append((t, "order_refunded", {"email": prof.email}, payload))
        c.last_order = None
        c.mood -= 0.15
        return out

    def _ticket(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        ticket = self._next_id("tkt")
        priority = self._weighted(_PRIORITIES, [15, 60, 20, 5])
        subject = self._fill(self._pick(_TICKET_SUBJECTS), c, prof)
        ident = {"email": prof.email}
        opened = {"ticket_id": ticket, "subject": subject, "priority": priority}
        out: list[_Touch] = [(t, "ticket_opened", ident, opened)]
        if rng.random() < 0.3:
            out += self._chat(c, prof, t + self._int(60, 3600))
        hours = {"urgent": 2, "high": 8, "normal": 24, "low": 72}[priority]
        t = out[-1][0] + int(min(rng.expovariate(1 / (hours * 3600)), 14 * 86400)) + 60
        resolution = self._weighted(_RESOLUTIONS, [80, 5, 5, 10])
        resolved: dict[str, Any] = {"ticket_id": ticket, "resolution": resolution}
        if rng.random() < 0.65:
            unsolved = 1.2 if resolution != "solved" else 0.0
            score = 4.2 + c.mood * 0.6 + rng.gauss(0.0, 0.7) - unsolved
            resolved["satisfaction"] = min(5, max(1, round(score)))
        out.append((t, "ticket_resolved", ident, resolved))
        return out

    def _consent(self, c: _Customer, prof: _Profile, t: int) -> list[_Touch]:
        rng = self.rng
        if c.can_email and rng.random() < 0.5:
            purpose, status = "email_marketing", "withdrawn"  # unsubscribed: goes quiet on email
            c.can_email = False
        elif not c.can_email and not c.bounced and rng.random() < 0.3:
            purpose, status = "email_marketing", "granted"
            c.can_email = True
        else:
            purpose = self._pick(["tracking", "profiling", "sms_marketing", "call_marketing"])
            status = "granted" if rng.random() < 0.6 else "withdrawn"
        payload = {"purpose": purpose, "status": status, "basis": "consent"}
        return [(t, "consent_changed", {"email": prof.email}, payload)]


_OUTCOMES = ["answered", "voicemail", "missed", "busy", "failed"]
_PRIORITIES = ["low", "normal", "high", "urgent"]
_RESOLUTIONS = ["solved", "wont_fix", "duplicate", "no_response"]
# uuid4 from 128 random bits: clear then set the version (4) and RFC 4122 variant bits.
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)


def _late_delay(rng: Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randint(3600, 12 * 3600)
    if r < 0.9:
        return rng.randint(12 * 3600, 3 * 86400)
    return rng.randint(3 * 86400, 10 * 86400)


def _to_minor(value: float, currency: str, rng: Random) -> int:
    """Whole minor units; most prices end in 99 or 95 as shop prices do."""
    units = max(1, round(value)) if _MINOR_UNITS.get(currency, 2) == 0 else max(1, int(value))
    if _MINOR_UNITS.get(currency, 2) == 0:
        return units
    r = rng.random()
    cents = 99 if r < 0.5 else 95 if r < 0.7 else rng.randrange(100)
    return units * 100 + cents


def _amount(minor: int, currency: str) -> str:
    if _MINOR_UNITS.get(currency, 2) == 0:
        return str(minor)
    return f"{minor // 100}.{minor % 100:02d}"


def _uuid(rng: Random) -> str:
    h = f"{rng.getrandbits(128) & _UUID_CLEAR | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --------------------------------------------------------------------------- noise

_UNKNOWN_TYPES = ["page_visited", "email_delivered", "cart_abandoned", "sms_sent", "OrderPlaced"]
_MISTAKES = [
    "naive_time",
    "float_money",
    "wrong_channel",
    "unknown_type",
    "missing_field",
    "broken_json",
    "bad_phone",
    "bad_currency",
    "bad_event_id",
]


def _mistake(rng: Random, line: bytes) -> bytes:
    """A realistic producer mistake built from a valid line; the contract rejects each kind."""
    kind = rng.choice(_MISTAKES)
    if kind == "broken_json":
        if rng.random() < 0.5:
            # A truncated write, cut between characters so the file stays valid UTF-8.
            text = line.decode()
            return text[: rng.randrange(1, len(text) - 1)].encode()
        return line[:-1] + b",}"  # a trailing comma
    doc = orjson.loads(line)
    doc["event_id"] = _uuid(rng)
    if kind == "naive_time":
        doc["occurred_at"] = doc["occurred_at"].rstrip("Z")
    elif kind in ("float_money", "bad_currency"):
        amount = round(rng.uniform(5, 300), 2)
        total: dict[str, Any] = {"amount": amount, "currency": "EUR"}
        if kind == "bad_currency":
            total = {"amount": f"{amount:.2f}", "currency": rng.choice(["EURO", "€", "usd", "XYZ"])}
        doc.update(channel="commerce", type="order_placed", source="shop")
        doc["payload"] = {
            "order_id": f"ord_x{rng.randrange(10**6):06d}",
            "total": total,
            "items": 1,
        }
    elif kind == "wrong_channel":
        doc["channel"] = rng.choice([ch for ch in CHANNELS if ch != doc["channel"]])
    elif kind == "unknown_type":
        doc["type"] = rng.choice(_UNKNOWN_TYPES)
    elif kind == "missing_field":
        del doc[rng.choice(["customer_id", "occurred_at", "event_id", "source", "payload"])]
    elif kind == "bad_phone":
        doc["identifiers"] = {
            **doc.get("identifiers", {}),
            "phone": f"0151 {rng.randrange(10**7):07d}",
        }
    elif kind == "bad_event_id":
        doc["event_id"] = str(rng.randrange(10**6))
    return orjson.dumps(doc)


# --------------------------------------------------------------------------- public API


def _lines(p: Plan, seed: int) -> Iterator[bytes]:
    valid = _Journeys(p, seed).valid_lines()
    if not p.duplicates and not p.invalid:
        yield from valid
        return
    # Noise draws from its own stream, so the valid events do not depend on the noise asked for.
    rng = Random(f"ledger-generate-noise:{seed}")
    recent: deque[bytes] = deque(maxlen=DUPLICATE_WINDOW)
    dups, bad, remaining = p.duplicates, p.invalid, p.events
    while remaining:
        # Selection sampling: exact counts, spread evenly through the output.
        r = rng.random() * remaining
        if recent and r < dups:
            dups -= 1
            yield recent[rng.randrange(len(recent))]
        elif recent and r < dups + bad:
            bad -= 1
            yield _mistake(rng, recent[rng.randrange(len(recent))])
        else:
            line = next(valid)
            recent.append(line)
            yield line
        remaining -= 1


def generate_events(
    customers: int,
    events: int,
    seed: int,
    start: dt.datetime | None = None,
    days: int = DEFAULT_DAYS,
    duplicates: float = 0.0,
    invalid: float = 0.0,
) -> Iterator[bytes]:
    """Yield ``events`` JSON lines (no newline) for ``customers`` customers, in arrival order.

    Deterministic for a seed. ``duplicates`` and ``invalid`` are the fractions of lines
    that repeat a recent line exactly or break the contract; the rest are distinct,
    valid events, at least one per customer. Raises :class:`GenerateError` for
    arguments no data set fits (checked before the first line is produced).
    """
    return _lines(
        plan(customers, events, start=start, days=days, duplicates=duplicates, invalid=invalid),
        seed,
    )


def write_jsonl(
    target: str | Path | IO[bytes],
    customers: int,
    events: int,
    seed: int,
    start: dt.datetime | None = None,
    days: int = DEFAULT_DAYS,
    duplicates: float = 0.0,
    invalid: float = 0.0,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Write the generated lines to a file (``"-"`` is stdout) and say what was written.

    ``on_progress`` receives the number of lines written so far, every few thousand.
    """
    p = plan(customers, events, start=start, days=days, duplicates=duplicates, invalid=invalid)
    began = time.perf_counter()
    if isinstance(target, (str, Path)) and str(target) != "-":
        with open(target, "wb") as file:
            lines, size = _write(file, _lines(p, seed), on_progress)
    else:
        stream: IO[bytes] = sys.stdout.buffer if isinstance(target, (str, Path)) else target
        lines, size = _write(stream, _lines(p, seed), on_progress)
        stream.flush()
    return Summary(p, lines, size, time.perf_counter() - began)


def _write(
    out: IO[bytes], lines: Iterator[bytes], on_progress: Callable[[int], None] | None
) -> tuple[int, int]:
    chunk: list[bytes] = []
    count = size = 0
    for line in lines:
        chunk.append(line)
        if len(chunk) == 8192:
            data = b"\n".join(chunk) + b"\n"
            out.write(data)
            count += len(chunk)
            size += len(data)
            chunk.clear()
            if on_progress:
                on_progress(count)
    if chunk:
        data = b"\n".join(chunk) + b"\n"
        out.write(data)
        count += len(chunk)
        size += len(data)
        if on_progress:
            on_progress(count)
    return count, size
