"""``ledger serve --workers N``: N collector processes on one port and one SQLite ledger.

One collector process is bound to one core (Python's GIL): HTTP, parsing, mapping,
identity resolution, validation and the append's own work all share it. Workers
split that work across cores; the appends themselves still take turns on the
ledger's single write lock (see :mod:`ledger.collector.intake`), and each group's
identity resolution is checked, and if need be redone, under that lock (see
:mod:`ledger.collector.identity`), so the guarantees are those of one collector.

The supervisor (this process) holds the listening socket and accepts connections
itself, handing each to the next worker in turn over a Unix socket pair
(``SCM_RIGHTS``). Workers sharing the listening socket instead would each grab
whatever connections are queued when they wake, and a few keep-alive clients (as
Segment's libraries hold) could all land on one worker. A worker that dies is
started again; one that fails while starting stops the collector with its error.
SIGTERM or SIGINT stops accepting and lets every worker finish its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

from ledger.ingest import GC_THRESHOLDS
from ledger.ledger import LedgerError
from ledger.settings import Settings

#: Exit status of a worker that could not open the collector (it printed why).
_START_FAILED = 3
_READY = b"R"


class _HandedServer(uvicorn.Server):
    """uvicorn serving connections the supervisor hands over ``channel``, not a listener."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket):
        super().__init__(config)
        self.channel = channel
        self._handing: set[asyncio.Task[Any]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(_START_FAILED)
        config = self.config
        loop = asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            # As uvicorn.Server.startup makes them for its listeners.
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        def receive() -> None:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, 64, 64)
            except (BlockingIOError, InterruptedError):
                return
            if not data:  # the supervisor is gone: finish what is in flight and leave
                loop.remove_reader(self.channel.fileno())
                self.should_exit = True
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                task = loop.create_task(loop.connect_accepted_socket(create_protocol, conn))
                self._handing.add(task)  # held until done (the loop keeps weak references)
                task.add_done_callback(self._handing.discard)

        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), receive)
        self.servers = []
        self.started = True
        self.channel.send(_READY)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        await super().shutdown(sockets)


@dataclass
class _Worker:
    pid: int
    channel: socket.socket
    started: float
    #: It answered that it serves (set once; a worker that never did failed to start).
    ready: bool = False
    #: Its end of the channel is open: connections may be handed to it.
    open: bool = True


def _run_worker(
    channel: socket.socket,
    settings: Settings,
    limits: dict[str, int],
    access_log: bool,
) -> None:
    """The body of a forked worker; never returns."""
    from ledger.collector.app import create_app, open_collector

    status = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own
        try:
            collector = open_collector(settings, limits, shared=True)
        except LedgerError as exc:
            print(f"error: worker {os.getpid()}: {exc}", file=sys.stderr)
            os._exit(_START_FAILED)
        app = create_app(settings, collector=collector)
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=access_log,
            lifespan="on",
            timeout_graceful_shutdown=30,
        )
        # uvicorn re-raises the signal that stopped it once it has shut down (and the
        # collector drained); ignored, the worker reports and exits 0 instead.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        _HandedServer(config, channel).run()
        again = collector.intake.regrouped
        print(
            f"collector worker {os.getpid()} stopped; {again} group"
            f"{'' if again == 1 else 's'} resolved again under the write lock (another "
            "worker had changed the identities they named)",
            file=sys.stderr,
        )
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a worker must never fall back into the supervisor's loop
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve_workers(
    settings: Settings,
    limits: dict[str, int],
    host: str,
    port: int,
    workers: int,
    access_log: bool = False,
    announce: Callable[[str], None] = print,
) -> int:
    """Run ``workers`` collector processes until SIGTERM/SIGINT; the exit status."""
    from ledger.collector.app import open_collector

    # A problem (key, store, another collector) as one line here, before any worker starts.
    open_collector(settings, limits, shared=True).close()
    listener = socket.create_server((host, port), backlog=2048)
    listener.setblocking(False)
    stopping = False
    failed = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    selector = selectors.DefaultSelector()
    pool: dict[int, _Worker] = {}

    def spawn() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the worker
            ours.close()
            listener.close()
            selector.close()
            for other in pool.values():
                other.channel.close()
            _run_worker(theirs, settings, limits, access_log)
        theirs.close()
        pool[pid] = _Worker(pid, ours, time.monotonic())
        selector.register(ours, selectors.EVENT_READ, pid)

    def hang_up(worker: _Worker) -> None:
        if worker.open:
            selector.unregister(worker.channel)
            worker.channel.close()
            worker.open = False

    for _ in range(workers):
        spawn()
    listening = False
    turn = 0
    while not stopping:
        for key, _ in selector.select(timeout=0.5):
            if key.fileobj is listener:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    ready = [w for w in pool.values() if w.ready and w.open]
                    with conn:  # closed here once handed over (the worker has its copy)
                        for n in range(len(ready)):
                            worker = ready[(turn + n) % len(ready)]
                            try:
                                socket.send_fds(worker.channel, [b"c"], [conn.fileno()])
                            except OSError:  # that worker is going: try the next
                                continue
                            turn = (turn + n + 1) % len(ready)
                            break
                continue
            worker = pool[key.data]
            try:
                data = worker.channel.recv(64)
            except OSError:
                data = b""
            if data:
                worker.ready = True
            else:
                hang_up(worker)  # its exit is reaped below
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            gone = pool.pop(pid, None)
            if gone is not None:
                hang_up(gone)
            if stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if gone is None or not gone.ready or code == _START_FAILED:
                announce(f"error: a collector worker failed to start (exit status {code})")
                stopping = failed = True
                break
            announce(f"collector worker {pid} ended (exit status {code}); starting another")
            spawn()
        all_ready = len(pool) == workers and all(w.ready for w in pool.values())
        if all_ready and not listening and not stopping:
            selector.register(listener, selectors.EVENT_READ, None)
            listening = True
            where = "PostgreSQL" if settings.store_url else str(settings.sqlite_path)
            announce(f"collector on http://{host}:{port} into {where} ({workers} workers)")
    # Stop: no new connections; each worker finishes its requests (uvicorn's graceful
    # shutdown), drains its writer and closes the ledger.
    if listening:
        selector.unregister(listener)
    listener.close()
    for worker in list(pool.values()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + 90  # uvicorn's 30 s for requests, then the writer's drain
    while pool:
        for pid in list(pool):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                hang_up(pool.pop(pid))
            elif time.monotonic() > deadline:
                announce(f"collector worker {pid} did not stop in time; killing it")
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    selector.close()
    return 1 if failed else 0
