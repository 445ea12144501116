"""The collector's ASGI app (Starlette on uvicorn): authentication, limits, routing, answers.

Status codes, as Segment's HTTP API uses them:

* 200 ``{"success": true, "stored": n, "rejected": [...]}`` once the events are
  committed to the ledger. Messages that broke the contract are listed in
  ``rejected`` with their reasons and kept in the dead-letter directory; the
  valid ones in the same request still land (Segment also answers 200 there).
* 400 for a request that cannot be read: malformed JSON, a body over 500 KB,
  a message over 32 KB, a batch that is not a list. Nothing of it is stored.
* 401 without a valid write key (basic-auth user name, or ``writeKey`` in the
  body as Segment also accepts), or without the provider signature a source
  requires (``unsigned``); 403 when the key's source may not write the channel a
  message maps to (a web key cannot write call events), or when a signature does
  not verify (``bad_signature``).
* 503 when the ledger could not commit: nothing was acknowledged, retry.

No request body, identifier or client address is logged (personal data); the
access log is off unless asked for.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ledger.collector import segment, webhooks
from ledger.collector.auth import SourceRegistry
from ledger.collector.db import CollectorDB
from ledger.collector.identity import GraphResolver, Pseudonyms, identity_key
from ledger.collector.intake import Intake, KafkaSink, LedgerSink, Problem, Sink
from ledger.collector.signing import WebhookSigning, master_key
from ledger.collector.touch import MappingError, Touch
from ledger.collector.wire import (
    MAX_BATCH_BYTES,
    Collector,
    Refusal,
    collector_of,
    guarded,
)
from ledger.contract import MAX_EVENT_BYTES
from ledger.deadletter import DeadLetters
from ledger.ledger import Ledger, LedgerError
from ledger.publisher import Publisher
from ledger.settings import Settings
from ledger.store.sqlite import SQLiteStore

#: Rest of the ledger's WAL checkpointer between checkpoints in a collector (the store's
#: default is 0.05 s). Each group dirties about one random page per event in the event-id
#: and customer indexes, and every checkpoint writes those pages again: checkpointing every
#: 0.2 s writes each hot page once for more groups. bench/collector.py, 8 connections, A/B
#: alternated: 2 workers 25.2-25.4k -> 27.9-28.9k events/s, server CPU 53-54 -> 45-46 µs per
#: event; one worker (0.5 s) 19.7-21.0k -> 21.1-24.0k. Past ~1 s the WAL grows to the
#: store's fallback and committing writers checkpoint themselves (2 s: 25.3k).
CHECKPOINT_INTERVAL_S = 0.2

# --------------------------------------------------------------------------- Segment routes


def _segment_call(call: str) -> Callable[[Request], Awaitable[Response]]:
    async def single(request: Request) -> Response:
        collector = collector_of(request)
        received = dt.datetime.now(dt.UTC)
        source = collector.header_source(request)
        data = await collector.body(request, MAX_EVENT_BYTES)
        msg = collector.parse(data)
        if not isinstance(msg, dict):
            raise Refusal(400, "invalid_message", "request body: expected a JSON object")
        source = collector.body_source(source, msg)
        msg.pop("writeKey", None)  # a credential: never into a dead-letter file
        try:
            touch = segment.map_message(msg, source=source.name, received_at=received, call=call)
        except MappingError as exc:
            problem = Problem(0, exc.problems, None, orjson.dumps(msg))
            return await collector.store(source, [], [problem])
        return await collector.store(source, [(0, touch)], [])

    single.__name__ = f"segment_{call}"
    return guarded(single)


@guarded
async def segment_batch(request: Request) -> Response:
    collector = collector_of(request)
    received = dt.datetime.now(dt.UTC)
    source = collector.header_source(request)
    data = await collector.body(request, MAX_BATCH_BYTES)
    body = collector.parse(data)
    source = collector.body_source(source, body)
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise Refusal(400, "invalid_batch", 'batch: expected {"batch": [message, ...]}')
    touches: list[tuple[int, Touch]] = []
    problems: list[Problem] = []
    sent_at = body.get("sentAt")
    for index, msg in enumerate(body["batch"]):
        raw = orjson.dumps(msg)
        if len(raw) > MAX_EVENT_BYTES:
            raise Refusal(
                400,
                "too_large",
                f"batch[{index}]: {len(raw):,} bytes is over the limit of "
                f"{MAX_EVENT_BYTES // 1024} KB per event",
            )
        try:
            touch = segment.map_message(
                msg, source=source.name, received_at=received, batch_sent_at=sent_at, raw=raw
            )
            touches.append((index, touch))
        except MappingError as exc:
            problems.append(Problem(index, exc.problems, None, raw))
    return await collector.store(source, touches, problems)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def routes() -> list[Route]:
    out = [Route("/health", health, methods=["GET"])]
    for call in segment.CALLS:
        endpoint = _segment_call(call)
        out.append(Route(f"/v1/{call}", endpoint, methods=["POST"]))
        # analytics.js posts to the one-letter forms (/v1/t, /v1/p, ...), key in the body.
        out.append(Route(f"/v1/{call[0]}", endpoint, methods=["POST"]))
    out.append(Route("/v1/batch", segment_batch, methods=["POST"]))
    out.append(Route("/v1/b", segment_batch, methods=["POST"]))
    return out + webhooks.routes()


def open_collector(
    settings: Settings, limits: dict[str, int] | None = None, *, shared: bool = False
) -> Collector:
    """Open everything the routes need; raises LedgerError (a sentence) when something can't.

    Claims the ledger for this collector first: the identity graph is resolved by one
    writer, so a second collector on the same ledger is refused. ``shared``: one of the
    workers of ``ledger serve --workers N`` (embedded SQLite ledger only): they share
    the claim, take turns to append, and check each group's identity resolution under
    the ledger's write lock (see :mod:`ledger.collector.identity`).
    """
    if shared and settings.kafka:
        raise LedgerError(
            "collector workers append to the embedded ledger only; with LEDGER_KAFKA set run "
            "one collector process (--workers 1)"
        )
    # The graph's own connection reads the graph; its changes ride in the ledger's append
    # transaction (embedded mode: they commit with their events, synced by the ledger, or
    # not at all). In the distributed mode it commits them after the broker's ack, without
    # an fsync of its own: a graph that lost its last commit to a power cut mostly heals
    # (the same identifiers mint the same ids; a lost link comes back as a merge when its
    # identifiers are next seen together).
    db = CollectorDB(settings, durable=False)
    closers: list[Callable[[], None]] = [db.close]
    try:
        db.claim_single_writer(shared=shared)
        sink: Sink
        if settings.kafka:
            # Distributed mode: the ingest worker appends from the topic; 2xx after the ack.
            sink = KafkaSink(Publisher(settings))
        else:
            turns = settings.home / "collector-append.lock" if shared else None
            ledger = Ledger.open(settings)
            if isinstance(ledger.store, SQLiteStore):
                ledger.store.checkpoint_interval = CHECKPOINT_INTERVAL_S
            sink = LedgerSink(ledger, turns)
        closers.append(sink.close)
        resolver = GraphResolver(db, Pseudonyms(identity_key(settings)), limits, shared=shared)
        # Key checks get their own connection: the event loop must never wait on the writer.
        keys_db = CollectorDB(settings)
        closers.append(keys_db.close)
        registry = SourceRegistry(keys_db)
        signing = WebhookSigning(keys_db, master_key(settings))
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    dead = DeadLetters(settings.rejected_dir)
    intake = Intake(sink, resolver, dead)
    closers[:0] = [intake.close, dead.close]  # drain the writer before closing what it uses
    return Collector(settings, registry, intake, closers, signing)


def create_app(
    settings: Settings | None = None,
    limits: dict[str, int] | None = None,
    collector: Collector | None = None,
) -> Starlette:
    """The collector's app; ``collector`` (from :func:`open_collector`) or opened at startup.

    ``limits``: identifiers of each kind one customer may hold (see :mod:`identity`).
    Whichever way it was opened, it is closed at shutdown, after in-flight requests.
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.collector = collector or open_collector(settings, limits)
        try:
            yield
        finally:
            app.state.collector.close()

    # Browsers post from the site's origin: any origin may send, none gets credentials (the
    # write key is the credential, and it is not secret from a browser anyway).
    cors = Middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["POST"],
        allow_headers=["Authorization", "Content-Type", "Content-Encoding"],
        max_age=86_400,
    )
    return Starlette(routes=routes(), lifespan=lifespan, middleware=[cors])
