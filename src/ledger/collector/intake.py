"""The collector's single writer: identity resolution, then the sink, group-committed.

Requests hand their touches to :class:`Intake` and wait for the future it
returns; one thread takes every waiting request at once (up to
``max_events``), resolves customers, writes them to the sink — one
``Ledger.append`` transaction that also holds the identity graph's changes, or
(distributed mode) the touchpoints topic until the broker acknowledged every
event, then the graph's own transaction — and only then completes the futures,
so an HTTP 2xx always follows a commit or an acknowledgement.
Grouping is what makes many small concurrent requests cheap: the fixed cost
of a transaction (lock, fsync) is paid once per group, not per request.

Rejections (contract or mapping problems) go to the dead-letter directory,
written by this thread alone.

Several collector processes on one ledger (``ledger serve --workers N``) each have
their own intake. Their appends take turns on an exclusive ``flock`` (a waiting
process wakes the moment the other's commit is done, where SQLite's busy handler
would sleep in steps of milliseconds), and each group's identity resolution is
checked under the ledger's write lock before its events are written, then resolved
again there if another process changed the graph meanwhile (:class:`_Group`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ledger.collector.identity import StaleGraph
from ledger.collector.touch import Touch
from ledger.contract import ContractError
from ledger.deadletter import DeadLetters
from ledger.ledger import Ledger
from ledger.publisher import Publisher, to_envelope

#: Called with the append transaction's DB-API connection before it commits.
Also = Callable[[Any], None]
#: Called with it first, under the write lock; may return other events to store instead.
Check = Callable[[Any], list[dict[str, Any]] | None]


class Sink(Protocol):
    """Where accepted events go: the embedded ledger, or Kafka in the distributed mode."""

    #: Whether :meth:`write` runs ``also`` inside its own transaction (else None is passed).
    transactional: bool

    def write(
        self,
        events: list[dict[str, Any]],
        also: Also | None = None,
        check: Check | None = None,
    ) -> dict[int, list[str]]:
        """Store durably (or raise); return {index: problems} of events the contract rejected.

        ``also``: called with the transaction's DB-API connection before it commits;
        ``check``: called with it first, under the write lock; may return other events to
        store instead (transactional sinks only)."""

    def close(self) -> None: ...


class LedgerSink:
    """``Ledger.append``: one transaction, committed before this returns; the identity
    graph's changes ride in it."""

    transactional = True

    def __init__(self, ledger: Ledger, turns: Path | None = None):
        """``turns``: a lock file the collector processes of this ledger take turns on
        (exclusive flock) for each append; None for a single collector."""
        self.ledger = ledger
        self._turns: IO[bytes] | None = turns.open("ab") if turns is not None else None

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        if self._turns is None:
            yield
            return
        fcntl.flock(self._turns, fcntl.LOCK_EX)  # blocks without the GIL
        try:
            yield
        finally:
            fcntl.flock(self._turns, fcntl.LOCK_UN)

    def write(
        self,
        events: list[dict[str, Any]],
        also: Also | None = None,
        check: Check | None = None,
    ) -> dict[int, list[str]]:
        valid, rejected = self.ledger.validate(events)
        failed = {r.index: r.problems for r in rejected}

        def checked(connection: Any) -> list[Any] | None:
            nonlocal failed
            assert check is not None
            instead = check(connection)
            if instead is None:
                return None
            again, rejected = self.ledger.validate(instead)
            failed = {r.index: r.problems for r in rejected}
            return again

        with self._turn():
            self.ledger.append_valid(valid, also=also, check=checked if check else None)
        return failed

    def close(self) -> None:
        self.ledger.close()
        if self._turns is not None:
            self._turns.close()


class KafkaSink:
    """The touchpoints topic through the SDK; returns once the broker acknowledged all."""

    transactional = False

    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    def write(
        self,
        events: list[dict[str, Any]],
        also: Also | None = None,
        check: Check | None = None,
    ) -> dict[int, list[str]]:
        rejected: dict[int, list[str]] = {}
        for index, event in enumerate(events):
            try:
                envelope = to_envelope(event, strict=self.publisher.strict)
            except ContractError as exc:
                rejected[index] = exc.problems
                continue
            self.publisher.publish(envelope)
        # Raises DeliveryError when any event went unacknowledged: the requests get a 503
        # and retry; what did arrive is stored once by the ingest worker (event ids).
        self.publisher.flush()
        return rejected

    def close(self) -> None:
        self.publisher.close()


class Resolver(Protocol):
    def resolve(self, touches: list[Touch]) -> list[dict[str, Any]]:
        """Set each touch's customer_id; return derived events (merges) to append with them."""

    def take(self) -> Any:
        """The changes resolved since the last take, for :meth:`writer` or :meth:`commit`."""

    def writer(self, pending: Any) -> Callable[[Any], None]:
        """A function writing ``pending`` through a transaction's DB-API connection."""

    def commit(self, pending: Any = None) -> None:
        """Make ``pending`` durable in a transaction of its own (after a broker's ack)."""

    def fresh(self, pending: Any, connection: Any) -> bool:
        """Under the write lock: is the graph still what ``pending`` was resolved against?"""

    def committed(self, pending: Any) -> None:
        """``pending`` was written (with its events)."""

    def rollback(self) -> None:
        """Forget the resolutions of a failed append."""


class _Group:
    """One group's graph changes on their way into the append's transaction.

    ``check`` runs first under the write lock: if another collector process changed the
    part of the graph this group was resolved against, the group is resolved again right
    there (the lock keeps the graph still) and its new events replace the old ones.
    ``write`` then writes whichever resolution stands.
    """

    def __init__(self, resolver: Resolver, touches: list[Touch], pending: Any):
        self.resolver = resolver
        self.touches = touches
        self.pending = pending
        self.again = 0

    def check(self, connection: Any) -> list[dict[str, Any]] | None:
        if self.resolver.fresh(self.pending, connection):
            return None
        self.again += 1
        self.resolver.rollback()  # the cache starts over from the tables as they are now
        derived = self.resolver.resolve(self.touches)
        self.pending = self.resolver.take()
        if not self.resolver.fresh(self.pending, connection):
            raise RuntimeError("the identity graph changed while the write lock was held")
        return [t.event for t in self.touches] + derived

    def write(self, connection: Any) -> None:
        self.resolver.writer(self.pending)(connection)


def _name_os_thread(name: str) -> None:
    """Give the current thread its name in the OS too (Linux: top -H, /proc/PID/task/*/comm),
    so its CPU time can be told apart from outside (bench/collector.py does)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the name is only cosmetic
        pass


@dataclass
class Problem:
    """A message that did not become an event: its index in the request, and why."""

    index: int
    problems: list[str]
    message_id: str | None = None
    raw: bytes | None = None


@dataclass
class Outcome:
    stored: int = 0
    rejected: list[Problem] = field(default_factory=list)


@dataclass
class _Job:
    source: str
    touches: list[tuple[int, Touch]]
    problems: list[Problem]
    future: Future[Outcome]


_STOP = object()


class Intake:
    def __init__(
        self,
        sink: Sink,
        resolver: Resolver,
        dead_letters: DeadLetters,
        *,
        max_events: int = 5_000,
    ):
        self.sink = sink
        self.resolver = resolver
        self.dead_letters = dead_letters
        self.max_events = max_events
        #: Groups resolved again under the lock (another process changed their graph).
        self.regrouped = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)
        self._thread.start()

    def submit(
        self, source: str, touches: list[tuple[int, Touch]], problems: list[Problem]
    ) -> Future[Outcome]:
        """Queue one request's touches (with their indexes in the request)."""
        future: Future[Outcome] = Future()
        self._queue.put(_Job(source, touches, problems, future))
        return future

    def close(self) -> None:
        """Finish every queued request, then stop the writer."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        _name_os_thread("collector-write")
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs = [first]
            count = len(first.touches)
            while count < self.max_events:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                jobs.append(nxt)
                count += len(nxt.touches)
            try:
                self._write(jobs)
            except Exception as exc:  # the writer must outlive any one group: never hang requests
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _write(self, jobs: list[_Job]) -> None:
        touches = [t for job in jobs for _, t in job.touches]
        try:
            derived = self.resolver.resolve(touches)
            events = [t.event for t in touches] + derived
            pending = self.resolver.take()
            if self.sink.transactional:  # the graph commits with its events, or neither
                group = _Group(self.resolver, touches, pending)
                failed = self.sink.write(events, also=group.write, check=group.check)
                self.resolver.committed(group.pending)
                self.regrouped += group.again
            else:
                failed = self.sink.write(events)
                self.resolver.commit(pending)
        except StaleGraph:
            # A forget elsewhere: start over from the tables (they now say who is gone) and
            # resolve the same requests again.
            self.resolver.rollback()
            self._write(jobs)
            return
        except Exception as exc:
            self.resolver.rollback()
            if len(jobs) > 1:
                # One request may be what failed the group: give each its own chance.
                for job in jobs:
                    self._write([job])
                return
            jobs[0].future.set_exception(exc)
            return
        offset = 0
        for job in jobs:
            outcome = Outcome(rejected=list(job.problems))
            for n, (index, touch) in enumerate(job.touches):
                problems = failed.get(offset + n)
                if problems is None:
                    outcome.stored += 1
                else:
                    event_id = str(touch.event.get("event_id"))
                    outcome.rejected.append(Problem(index, problems, event_id, touch.raw))
            offset += len(job.touches)
            outcome.rejected.sort(key=lambda p: p.index)
            for problem in outcome.rejected:
                self.dead_letters.write(
                    f"http:{job.source}", problem.index, problem.problems, problem.raw
                )
            # Closing flushes: a dead letter must be on disk before the client hears of it.
            self.dead_letters.close()
            job.future.set_result(outcome)
        for index, problems in failed.items():
            if index >= len(touches):  # a derived identity event: a bug here, kept for a person
                self.dead_letters.write("collector:identity", None, problems, None)
                self.dead_letters.close()
