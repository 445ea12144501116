"""HTTP plumbing every collector route shares: body limits, JSON, write keys, answers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ledger.collector.auth import Source, SourceRegistry
from ledger.collector.intake import Intake, Outcome, Problem
from ledger.collector.signing import SignatureRefused, WebhookSigning
from ledger.collector.touch import Touch
from ledger.ledger import LedgerError
from ledger.settings import Settings

MAX_BATCH_BYTES = 500 * 1024
log = logging.getLogger("ledger.collector")


class Refusal(Exception):
    """A request answered with an error status and a sentence."""

    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


def refusal_response(exc: Refusal) -> JSONResponse:
    # Only a missing or bad key asks for basic auth (Twilio then retries with credentials).
    headers = {"WWW-Authenticate": 'Basic realm="ledger"'} if exc.code == "unauthorized" else None
    return JSONResponse(
        {"success": False, "code": exc.code, "message": exc.message}, exc.status, headers
    )


@dataclass
class Collector:
    """What the routes share: the key registry and the single writer."""

    settings: Settings
    registry: SourceRegistry
    intake: Intake
    #: What to close at shutdown, in order (the writer first).
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: Per-source provider signatures (SendGrid, Twilio); None: no source may configure them.
    signing: WebhookSigning | None = None

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers = []

    async def body(self, request: Request, limit: int) -> bytes:
        """The request body, refused past ``limit`` bytes (before and after gunzip)."""
        what = "batch" if limit == MAX_BATCH_BYTES else "event"
        too_big = Refusal(
            400, "too_large", f"request body: the {what} is over the limit of {limit // 1024} KB"
        )
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        data = b"".join(chunks)
        if request.headers.get("content-encoding", "").lower() == "gzip":
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                data = inflate.decompress(data, limit + 1)
            except zlib.error as exc:
                raise Refusal(
                    400, "bad_encoding", f"request body: not valid gzip ({exc})"
                ) from None
            if len(data) > limit or inflate.unconsumed_tail:
                raise too_big
        return data

    @staticmethod
    def parse(data: bytes) -> Any:
        if not data.strip():
            raise Refusal(400, "invalid_json", "request body: empty; expected a JSON object")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise Refusal(400, "invalid_json", f"request body: not valid JSON ({exc})") from None

    def key_source(self, key: str) -> Source:
        source = self.registry.check(key)
        if source is None:
            raise Refusal(401, "unauthorized", "the write key is unknown or revoked")
        return source

    def header_source(self, request: Request) -> Source | None:
        """The source of the basic-auth write key, checked before the body is read."""
        header = request.headers.get("authorization", "")
        if not header:
            return None
        if header[:6].lower() != "basic ":
            raise Refusal(401, "unauthorized", "Authorization: expected Basic with the write key")
        try:
            key = base64.b64decode(header[6:].strip(), validate=True).decode().split(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            raise Refusal(
                401, "unauthorized", "Authorization: not valid basic-auth credentials"
            ) from None
        return self.key_source(key)

    def check_signature(
        self,
        provider: str,
        source: Source,
        request: Request,
        data: bytes,
        params: dict[str, list[str]] | None = None,
    ) -> None:
        """Refuse a request the source's signing configuration does not accept (401/403)."""
        if self.signing is None:
            return
        try:
            if provider == "sendgrid":
                self.signing.check_sendgrid(source.name, data, request.headers)
            else:
                self.signing.check_twilio(
                    source.name,
                    str(request.url),
                    params or {},
                    request.headers,
                    _userinfo(request.headers.get("authorization", "")),
                )
        except SignatureRefused as exc:
            code = "unsigned" if exc.status == 401 else "bad_signature"
            raise Refusal(exc.status, code, exc.message) from None
        except LedgerError as exc:  # a stored secret that no longer decrypts: say so
            raise Refusal(500, "misconfigured", str(exc)) from None

    def body_source(self, source: Source | None, body: Any) -> Source:
        """Segment also accepts the key as ``writeKey`` in the body."""
        if source is not None:
            return source
        if isinstance(body, dict) and isinstance(body.get("writeKey"), str) and body["writeKey"]:
            return self.key_source(body["writeKey"])
        raise Refusal(
            401,
            "unauthorized",
            "no write key: send it as the basic-auth user name (Segment's convention)",
        )

    async def store(
        self, source: Source, touches: list[tuple[int, Touch]], problems: list[Problem]
    ) -> JSONResponse:
        """Check channels, append through the writer, answer after the commit."""
        for index, touch in touches:
            channel = touch.event["channel"]
            # System events (identity links, consent) are derived by the collector's own
            # mappings from what the source may send, so any key may carry them.
            if channel != "system" and channel not in source.channels:
                raise Refusal(
                    403,
                    "forbidden",
                    f"message {index}: source {source.name!r} may write "
                    f"{', '.join(source.channels)}, not {channel!r} events "
                    f"({touch.event['type']})",
                )
        future = self.intake.submit(source.name, touches, problems)
        try:
            outcome: Outcome = await asyncio.wrap_future(future)
        except Exception as exc:
            log.error("append failed for source %s: %s", source.name, type(exc).__name__)
            raise Refusal(
                503, "unavailable", f"the ledger could not store the events ({exc}); retry"
            ) from None
        return JSONResponse(
            {
                "success": True,
                "stored": outcome.stored,
                "rejected": [
                    {"index": p.index, "event_id": p.message_id, "problems": p.problems}
                    for p in outcome.rejected
                ],
            }
        )


def _userinfo(header: str) -> str | None:
    """``user:password`` of a basic-auth header (for URLs that carried the credentials)."""
    if header[:6].lower() != "basic ":
        return None
    try:
        return base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def collector_of(request: Request) -> Collector:
    collector: Collector = request.app.state.collector
    return collector


def guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Turn refusals into their answers; anything unexpected into a 500 without details."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Refusal as exc:
            return refusal_response(exc)
        except Exception as exc:
            # Answered here, not by Starlette's error middleware, which re-raises for the
            # server to log a traceback whose messages may quote personal data.
            log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
            return JSONResponse(
                {"success": False, "code": "internal", "message": "internal error; retry later"},
                500,
            )

    endpoint.__name__ = handler.__name__
    return endpoint
